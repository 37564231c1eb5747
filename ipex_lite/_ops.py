"""Fake (meta) kernels and autograd formulas for the ops in torch.ops.ipex_lite.

The C++ library registers schemas and CPU/Autocast kernels; this module adds
what torch.compile (fake tensors) and autograd need.  Imported once by
ipex_lite/__init__.py.
"""
import torch

ops = torch.ops.ipex_lite


def _check_interaction_inputs(op, inputs):
    torch._check(len(inputs) > 0, lambda: f"{op}: inputs must hold at least one tensor")
    first = inputs[0]
    for i, t in enumerate(inputs):
        torch._check(t.device == first.device,
                     lambda: f"{op}: inputs[{i}] is on {t.device} but inputs[0] is on {first.device}")
        torch._check(t.dim() == 2, lambda: f"{op}: inputs[{i}] must be 2-D (batch, dim), got {tuple(t.shape)}")
        torch._check(t.dtype == first.dtype,
                     lambda: f"{op}: inputs[{i}] has dtype {t.dtype} but inputs[0] has {first.dtype}")
        torch._check(t.shape == first.shape,
                     lambda: f"{op}: inputs[{i}] has shape {tuple(t.shape)} but inputs[0] has {tuple(first.shape)}")


@torch.library.register_fake("ipex_lite::interaction_forward")
def _interaction_forward_fake(inputs):
    _check_interaction_inputs("interaction_forward", inputs)
    n = len(inputs)
    batch, dim = inputs[0].shape
    return inputs[0].new_empty((batch, dim + n * (n - 1) // 2))


def _check_interaction_grad(op, grad_out, inputs):
    _check_interaction_inputs(op, inputs)
    n = len(inputs)
    batch, dim = inputs[0].shape
    want = (batch, dim + n * (n - 1) // 2)
    torch._check(tuple(grad_out.shape) == want,
                 lambda: f"{op}: grad_out must have shape {want}, got {tuple(grad_out.shape)}")
    torch._check(grad_out.dtype == inputs[0].dtype,
                 lambda: f"{op}: grad_out has dtype {grad_out.dtype} but the inputs have {inputs[0].dtype}")


@torch.library.register_fake("ipex_lite::interaction_backward")
def _interaction_backward_fake(grad_out, inputs):
    _check_interaction_grad("interaction_backward", grad_out, inputs)
    return [t.new_empty(t.shape) for t in inputs]


@torch.library.register_fake("ipex_lite::interaction_backward_stacked")
def _interaction_backward_stacked_fake(grad_out, inputs):
    _check_interaction_grad("interaction_backward_stacked", grad_out, inputs)
    return inputs[0].new_empty((len(inputs), *inputs[0].shape))


@torch.library.register_fake("ipex_lite::scaled_dot_product_attention")
def _sdpa_fake(query, key, value, attn_mask=None, is_causal=False, scale=None):
    op = "scaled_dot_product_attention"
    for name, t in (("query", query), ("key", key), ("value", value)):
        torch._check(t.device == query.device, lambda: f"{op}: {name} is on {t.device} but query is on {query.device}")
        torch._check(t.dim() == 4, lambda: f"{op}: {name} must be 4-D (batch, heads, length, dim), got {tuple(t.shape)}")
        torch._check(t.dtype in (torch.float32, torch.bfloat16) and t.dtype == query.dtype,
                     lambda: f"{op}: query, key and value must share one dtype, float32 or bfloat16")
    b, h, lq, e = query.shape
    torch._check(key.shape[:2] == (b, h) and key.shape[3] == e and value.shape[:3] == key.shape[:3],
                 lambda: f"{op}: key {tuple(key.shape)} / value {tuple(value.shape)} do not match query {tuple(query.shape)}")
    torch._check(not (attn_mask is not None and is_causal), lambda: f"{op}: pass attn_mask or is_causal, not both")
    # (B, Lq, H, Ev) storage, as the CPU kernel writes it
    return query.new_empty((b, lq, h, value.shape[3])).permute(0, 2, 1, 3)


@torch.library.register_fake("ipex_lite::winograd_conv2d")
def _winograd_conv2d_fake(input, weight, bias, padding, out_channels, attr):
    op = "winograd_conv2d"
    for name, t in (("weight", weight), ("bias", bias)):
        torch._check(t is None or t.device == input.device,
                     lambda: f"{op}: {name} is on {t.device} but input is on {input.device}")
    torch._check(input.dim() == 4, lambda: f"{op}: input must be 4-D (N, C, H, W), got {tuple(input.shape)}")
    n, c, h, w = input.shape
    want = (16, (out_channels + 63) // 64, c, 64)
    torch._check(tuple(weight.shape) == want, lambda: f"{op}: weight must have shape {want}, got {tuple(weight.shape)}")
    out_h, out_w = h + 2 * padding[0] - 2, w + 2 * padding[1] - 2
    torch._check(out_h > 0 and out_w > 0, lambda: f"{op}: input is smaller than the 3x3 kernel")
    return input.new_empty((n, out_channels, out_h, out_w)).contiguous(memory_format=torch.channels_last)


def _pooled_size(size, k, s, p, d, ceil_mode):
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    return out - 1 if ceil_mode and (out - 1) * s >= size + p else out


@torch.library.register_fake("ipex_lite::max_pool2d")
def _max_pool2d_fake(input, kernel_size, stride, padding, dilation, ceil_mode):
    torch._check(input.dim() == 4, lambda: f"max_pool2d: input must be 4-D (N, C, H, W), got {tuple(input.shape)}")
    n, c, h, w = input.shape
    oh, ow = (_pooled_size(*args, ceil_mode) for args in zip((h, w), kernel_size, stride, padding, dilation))
    torch._check(oh > 0 and ow > 0, lambda: "max_pool2d: input is too small for the kernel")
    return input.new_empty((n, c, oh, ow)).contiguous(memory_format=torch.channels_last)


def _interaction_setup_context(ctx, inputs, output):
    (tensors,) = inputs
    ctx.save_for_backward(*tensors)


def _interaction_backward(ctx, grad_out):
    tensors = list(ctx.saved_tensors)
    # rows of one block: see interaction_backward_stacked in csrc/ops/interaction.cpp
    return (list(ops.interaction_backward_stacked(grad_out.to(tensors[0].dtype), tensors).unbind(0)),)


torch.library.register_autograd("ipex_lite::interaction_forward", _interaction_backward,
                                setup_context=_interaction_setup_context)


# ---- merged embedding bags ---------------------------------------------------

def _bags(offsets, include_last_offset):
    return offsets[0].shape[0] - (1 if include_last_offset else 0)


def _check_tables(op, weights, indices, offsets):
    torch._check(len(weights) > 0, lambda: f"{op}: weights must hold at least one table")
    torch._check(len(indices) == len(weights) and len(offsets) == len(weights),
                 lambda: f"{op}: weights, indices and offsets must have one entry per table")
    device = weights[0].device
    for name, ts in (("weights", weights), ("indices", indices), ("offsets", offsets)):
        for i, t in enumerate(ts):
            torch._check(t.device == device,
                         lambda: f"{op}: {name}[{i}] is on {t.device} but weights[0] is on {device}")


@torch.library.register_fake("ipex_lite::merged_embedding_bag_forward")
def _meb_forward_fake(weights, indices, offsets, pooling_mode, include_last_offset, per_sample_weights):
    _check_tables("merged_embedding_bag_forward", weights, indices, offsets)
    batch = _bags(offsets, include_last_offset)
    return [weights[0].new_empty((batch, weights[0].shape[1])) for _ in weights]


@torch.library.register_fake("ipex_lite::merged_embedding_bag_cat_forward")
def _meb_cat_forward_fake(dense, weights, indices, offsets, pooling_mode, include_last_offset,
                          per_sample_weights):
    _check_tables("merged_embedding_bag_cat_forward", weights, indices, offsets)
    batch = _bags(offsets, include_last_offset)
    return weights[0].new_empty((batch, (len(weights) + 1) * weights[0].shape[1]))


@torch.library.register_fake("ipex_lite::merged_embedding_bag_backward")
def _meb_backward_fake(grads, weights, indices, offsets, pooling_mode, include_last_offset,
                       per_sample_weights):
    _check_tables("merged_embedding_bag_backward", weights, indices, offsets)
    return [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]


@torch.library.register_fake("ipex_lite::merged_embedding_bag_backward_rows")
def _meb_backward_rows_fake(grads, weights, indices, offsets, pooling_mode, include_last_offset,
                            per_sample_weights):
    _check_tables("merged_embedding_bag_backward_rows", weights, indices, offsets)
    ctx = torch.library.get_ctx()
    rows, values = [], []
    for w in weights:
        n = ctx.new_dynamic_size()
        rows.append(w.new_empty((n,), dtype=torch.long))
        values.append(w.new_empty((n, w.shape[1])))
    return rows, values


@torch.library.register_fake("ipex_lite::merged_embedding_bag_sgd_")
def _meb_sgd_fake(grads, weights, trails, indices, offsets, pooling_mode, include_last_offset,
                  per_sample_weights, lr, weight_decay):
    return None


@torch.library.register_fake("ipex_lite::merged_embedding_bag_adagrad_")
def _meb_adagrad_fake(grads, weights, trails, state_sums, indices, offsets, pooling_mode, include_last_offset,
                      per_sample_weights, lr, eps):
    return None


def _no_psw_grad(psw):
    if any(p.requires_grad for p in psw):
        raise RuntimeError("merged_embedding_bag: gradients with respect to per_sample_weights are not supported; "
                           "pass them detached")


@torch.library.register_fake("ipex_lite::advise_hugepages")
def _advise_hugepages_fake(t):
    return False


def _meb_setup_context(ctx, inputs, output):
    weights, indices, offsets, mode, include_last, psw = inputs
    _no_psw_grad(psw)
    ctx.num_tables = len(weights)
    ctx.lookup = (mode, include_last)
    ctx.save_for_backward(*weights, *indices, *offsets, *psw)
    ctx.has_psw = len(psw) > 0


def _meb_saved(ctx):
    saved = list(ctx.saved_tensors)
    t = ctx.num_tables
    weights, indices, offsets = saved[:t], saved[t:2 * t], saved[2 * t:3 * t]
    psw = saved[3 * t:] if ctx.has_psw else []
    return weights, indices, offsets, psw


def _meb_backward(ctx, grads):
    weights, indices, offsets, psw = _meb_saved(ctx)
    mode, include_last = ctx.lookup
    # an output the loss did not use arrives as None
    grads = [g if g is not None else w.new_zeros((_bags(offsets, include_last), w.shape[1]))
             for g, w in zip(grads, weights)]
    dense = ops.merged_embedding_bag_backward(grads, weights, indices, offsets, mode, include_last, psw)
    t = ctx.num_tables
    return list(dense), [None] * t, [None] * t, None, None, [None] * len(psw)


torch.library.register_autograd("ipex_lite::merged_embedding_bag_forward", _meb_backward,
                                setup_context=_meb_setup_context)


def _meb_cat_setup_context(ctx, inputs, output):
    dense, weights, indices, offsets, mode, include_last, psw = inputs
    _meb_setup_context(ctx, (weights, indices, offsets, mode, include_last, psw), output)
    ctx.dim = dense.shape[1]


def _meb_cat_backward(ctx, grad):
    weights, indices, offsets, psw = _meb_saved(ctx)
    mode, include_last = ctx.lookup
    d = ctx.dim
    table_grads = [grad[:, (t + 1) * d:(t + 2) * d] for t in range(ctx.num_tables)]
    dense = ops.merged_embedding_bag_backward(table_grads, weights, indices, offsets, mode, include_last, psw)
    t = ctx.num_tables
    return grad[:, :d].clone(), list(dense), [None] * t, [None] * t, None, None, [None] * len(psw)


torch.library.register_autograd("ipex_lite::merged_embedding_bag_cat_forward", _meb_cat_backward,
                                setup_context=_meb_cat_setup_context)


# ---- split-BF16 and fused optimizer steps -----------------------------------

@torch.library.register_fake("ipex_lite::split_float_bfloat16")
def _split_fake(t):
    torch._check(t.dtype == torch.float32, lambda: "split_float_bfloat16: expected a float32 tensor")
    return (torch.empty_like(t, dtype=torch.bfloat16, memory_format=torch.contiguous_format),
            torch.empty_like(t, dtype=torch.bfloat16, memory_format=torch.contiguous_format))


@torch.library.register_fake("ipex_lite::cat_bfloat16_float")
def _cat_fake(top, trail):
    torch._check(top.shape == trail.shape, lambda: "cat_bfloat16_float: top and trail shapes differ")
    return torch.empty_like(top, dtype=torch.float32, memory_format=torch.contiguous_format)


for _name in ("packed_add", "sgd_step_", "adam_step_", "adagrad_step_", "lamb_step_"):
    torch.library.register_fake(f"ipex_lite::{_name}")(lambda *args, **kwargs: None)


@torch.library.register_fake("ipex_lite::quantize_per_tensor")
def _quantize_fake(input, scale, zero_point, dtype):
    torch._check(dtype in (torch.uint8, torch.int8), lambda: "quantize_per_tensor: dtype must be uint8 or int8")
    return torch.empty_like(input, dtype=dtype)


@torch.library.register_fake("ipex_lite::quantize_per_token")
def _quantize_per_token_fake(input):
    torch._check(input.is_floating_point(), lambda: "quantize_per_token: input must be floating point")
    torch._check(input.dim() >= 1, lambda: "quantize_per_token: input must have at least one dimension")
    return (input.new_empty(input.shape, dtype=torch.uint8),
            input.new_empty(input.shape[:-1], dtype=torch.float32))


@torch.library.register_fake("ipex_lite::lookup_u8")
def _lookup_u8_fake(input, table):
    torch._check(input.dtype == torch.uint8, lambda: "lookup_u8: input must be uint8")
    torch._check(table.dtype == torch.uint8 and table.shape == (256,), lambda: "lookup_u8: table must be 256 uint8")
    return torch.empty_like(input)


@torch.library.register_fake("ipex_lite::dequantize_per_tensor")
def _dequantize_fake(input, scale, zero_point):
    return torch.empty_like(input, dtype=torch.float32)


# ---------------------------------------------------------------- vision
@torch.library.register_fake("ipex_lite::frozen_batch_norm")
def _frozen_bn_fake(input, weight, bias, running_mean, running_var, eps):
    torch._check(input.dim() >= 2, lambda: "frozen_batch_norm: input must be (N, C, ...)")
    cl = input.dim() == 4 and not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last)
    return torch.empty_like(input, memory_format=torch.channels_last if cl else torch.contiguous_format)


def _frozen_bn_setup(ctx, inputs, output):
    _, weight, bias, running_mean, running_var, eps = inputs
    ctx.save_for_backward(weight, running_var)
    ctx.eps = eps


def _frozen_bn_backward(ctx, grad):
    weight, running_var = ctx.saved_tensors
    zeros = torch.zeros_like(running_var)
    # d(x * scale + shift)/dx = scale: the same affine with a zero shift
    return ops.frozen_batch_norm(grad, weight, zeros, zeros, running_var, ctx.eps), None, None, None, None, None


torch.library.register_autograd("ipex_lite::frozen_batch_norm", _frozen_bn_backward, setup_context=_frozen_bn_setup)


@torch.library.register_fake("ipex_lite::roi_align_forward")
def _roi_align_fake(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    torch._check(input.dim() == 4, lambda: "roi_align_forward: input must be (N, C, H, W)")
    torch._check(rois.dim() == 2 and rois.shape[1] == 5, lambda: "roi_align_forward: rois must be (K, 5)")
    out = input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))
    if not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


@torch.library.register_fake("ipex_lite::roi_align_backward")
def _roi_align_backward_fake(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height,
                             width, sampling_ratio, aligned, channels_last):
    out = grad.new_empty((batch_size, channels, height, width))
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def _roi_align_setup(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.args = (spatial_scale, pooled_height, pooled_width, *input.shape, sampling_ratio, aligned,
                not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last))


def _roi_align_backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    scale, ph, pw, n, c, h, w, sampling_ratio, aligned, channels_last = ctx.args
    grad_input = ops.roi_align_backward(grad, rois, scale, ph, pw, n, c, h, w, sampling_ratio, aligned, channels_last)
    return grad_input, None, None, None, None, None, None


torch.library.register_autograd("ipex_lite::roi_align_forward", _roi_align_backward, setup_context=_roi_align_setup)


# ---- packed_conv / packed_linear (traced graphs of optimized models; csrc/ops/packed_weights.cpp)
def _check_packed_operands(op, x, w, dim):
    torch._check(w.dim() == dim, lambda: f"{op}: weight must be a dense CPU tensor with {dim} dims, got {tuple(w.shape)}")
    torch._check(x.dtype == w.dtype and w.dtype in (torch.float32, torch.bfloat16),
                 lambda: f"{op}: input and weight must both be float32 or both bfloat16, got {x.dtype} and {w.dtype}")


def _conv_out_shape(op, x, w, padding, stride, dilation, groups):
    torch._check(x.shape[1] == w.shape[1] * groups,
                 lambda: f"{op}: input has {x.shape[1]} channels, the weight expects {w.shape[1] * groups}")
    spatial = [(n + 2 * p - d * (k - 1) - 1) // s + 1
               for n, k, p, s, d in zip(x.shape[2:], w.shape[2:], padding, stride, dilation)]
    return (x.shape[0], w.shape[0], *spatial)


def _packed_conv_out(op, x, w, padding, stride, dilation, groups):
    _check_packed_operands(op, x, w, x.dim())
    torch._check(x.dim() in (4, 5), lambda: f"{op}: input must be 4-D or 5-D, got {tuple(x.shape)}")
    shape = _conv_out_shape(op, x, w, padding, stride, dilation, groups)
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d  # oneDNN's output, whatever the input
    return x.new_empty(shape).contiguous(memory_format=fmt)


@torch.library.register_fake("ipex_lite::packed_conv")
def _packed_conv_fake(x, w, b, padding, stride, dilation, groups, attr, scalars, algorithm):
    return _packed_conv_out("packed_conv", x, w, padding, stride, dilation, groups)


@torch.library.register_fake("ipex_lite::packed_conv_add")
def _packed_conv_add_fake(x, other, w, b, padding, stride, dilation, groups, unary_attr, unary_scalars,
                          unary_algorithm):
    torch._check(other.dtype == x.dtype, lambda: "packed_conv_add: other must have the input's dtype")
    return _packed_conv_out("packed_conv_add", x, w, padding, stride, dilation, groups)


@torch.library.register_fake("ipex_lite::packed_conv_add_")
def _packed_conv_add_inplace_fake(other, x, w, b, padding, stride, dilation, groups, unary_attr, unary_scalars,
                                  unary_algorithm):
    torch._check(other.dtype == x.dtype, lambda: "packed_conv_add_: other must have the input's dtype")
    out = _packed_conv_out("packed_conv_add_", x, w, padding, stride, dilation, groups)
    torch._check(other.shape == out.shape,
                 lambda: f"packed_conv_add_: other has shape {tuple(other.shape)}, the output {tuple(out.shape)}")


def _packed_linear_out(op, x, w):
    _check_packed_operands(op, x, w, 2)
    torch._check(x.dim() >= 1 and x.shape[-1] == w.shape[1],
                 lambda: f"{op}: input's last dimension is {x.shape[-1] if x.dim() else 0}, "
                         f"the weight expects {w.shape[1]}")
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@torch.library.register_fake("ipex_lite::packed_linear")
def _packed_linear_fake(x, w, b, attr, scalars, algorithm):
    return _packed_linear_out("packed_linear", x, w)


@torch.library.register_fake("ipex_lite::packed_linear_add")
def _packed_linear_add_fake(x, other, w, b):
    return _packed_linear_out("packed_linear_add", x, w)


@torch.library.register_fake("ipex_lite::packed_linear_mkl")
def _packed_linear_mkl_fake(x, w, b):
    torch._check(w.dtype == torch.float32,
                 lambda: f"packed_linear_mkl: MKL's packed GEMM is float32 only, got {w.dtype}")
    return _packed_linear_out("packed_linear_mkl", x, w)


# ---- int8 graph ops (traced graphs of QuantizedConv / QuantizedLinear; csrc/ops/packed_weights.cpp)
def _check_quantized_operands(op, qx, qw, dim):
    torch._check(qw.dtype == torch.int8 and qw.dim() == dim,
                 lambda: f"{op}: weight must be a dense int8 CPU tensor with {dim} dims, got {qw.dtype} {tuple(qw.shape)}")
    torch._check(qx.dtype == torch.uint8, lambda: f"{op}: input must be a dense uint8 CPU tensor, got {qx.dtype}")


def _packed_qconv_out(op, qx, qw, stride, padding, dilation, groups, out_dtype):
    _check_quantized_operands(op, qx, qw, qx.dim())
    torch._check(qx.dim() in (3, 4), lambda: f"{op}: input must be 3-D or 4-D, got {tuple(qx.shape)}")
    out = qx.new_empty(_conv_out_shape(op, qx, qw, padding, stride, dilation, groups), dtype=out_dtype)
    return out.contiguous(memory_format=torch.channels_last) if qx.dim() == 4 else out


@torch.library.register_fake("ipex_lite::packed_qconv")
def _packed_qconv_fake(qx, x_scale, x_zp, qw, w_scales, w_zps, b, stride, padding, dilation, groups, out_scale,
                       out_zp, out_dtype, attr, scalars, algorithm):
    return _packed_qconv_out("packed_qconv", qx, qw, stride, padding, dilation, groups, out_dtype)


@torch.library.register_fake("ipex_lite::packed_qconv_add")
def _packed_qconv_add_fake(qx, x_scale, x_zp, qw, w_scales, w_zps, accum, b, stride, padding, dilation, groups,
                           out_scale, out_zp, out_dtype, accum_scale, accum_zp, unary_attr, unary_scalars,
                           unary_algorithm):
    return _packed_qconv_out("packed_qconv_add", qx, qw, stride, padding, dilation, groups, out_dtype)


@torch.library.register_fake("ipex_lite::packed_qlinear")
def _packed_qlinear_fake(qx, x_scale, x_zp, qw, w_scales, w_zps, other, b, out_scale, out_zp, out_dtype, attr,
                         scalars, algorithm):
    _check_quantized_operands("packed_qlinear", qx, qw, 2)
    torch._check(qx.dim() == 2 and qx.shape[1] == qw.shape[1],
                 lambda: f"packed_qlinear: input must be (rows, {qw.shape[1]}), got {tuple(qx.shape)}")
    return qx.new_empty((qx.shape[0], qw.shape[0]), dtype=out_dtype)


# ---------------------------------------------------------------- decoder-LLM ops (ipex_lite.llm)

@torch.library.register_fake("ipex_lite::linear_small_m")
def _linear_small_m_fake(input, weight, bias=None):
    op = "linear_small_m"
    torch._check(weight.dim() == 2 and weight.dtype == torch.bfloat16,
                 lambda: f"{op}: weight must be a 2-D bfloat16 tensor, got {weight.dtype} {tuple(weight.shape)}")
    torch._check(input.dtype in (torch.float32, torch.bfloat16), lambda: f"{op}: input must be float32 or bfloat16")
    torch._check(input.dim() >= 1 and input.shape[-1] == weight.shape[1],
                 lambda: f"{op}: input has {input.shape[-1]} features but weight expects {weight.shape[1]}")
    torch._check(bias is None or tuple(bias.shape) == (weight.shape[0],),
                 lambda: f"{op}: bias must have shape ({weight.shape[0]},)")
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


def _rms_norm_fake_checks(op, input, weight):
    torch._check(input.dtype in (torch.float32, torch.bfloat16), lambda: f"{op}: input must be float32 or bfloat16")
    torch._check(input.dim() >= 1 and input.shape[-1] > 0, lambda: f"{op}: input needs a non-empty last dimension")
    torch._check(tuple(weight.shape) == (input.shape[-1],) and weight.dtype == input.dtype,
                 lambda: f"{op}: weight must be ({input.shape[-1]},) of dtype {input.dtype}")


@torch.library.register_fake("ipex_lite::rms_norm")
def _rms_norm_fake(input, weight, eps):
    _rms_norm_fake_checks("rms_norm", input, weight)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("ipex_lite::add_rms_norm")
def _add_rms_norm_fake(input, residual, weight, eps):
    _rms_norm_fake_checks("add_rms_norm", input, weight)
    torch._check(residual.shape == input.shape and residual.dtype == input.dtype,
                 lambda: "add_rms_norm: residual must have input's shape and dtype")
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("ipex_lite::rotary_embedding_")
def _rotary_fake(input, cos, sin):
    torch._check(input.dim() == 4, lambda: "rotary_embedding_: input must be 4-D (batch, sequence, heads, head_dim)")
    torch._check(cos.shape == sin.shape and cos.shape[-1] % 2 == 0 and cos.shape[-1] <= input.shape[-1],
                 lambda: "rotary_embedding_: cos/sin must share a shape with an even rotary dim <= head_dim")
    return None


@torch.library.register_fake("ipex_lite::silu_mul")
def _silu_mul_fake(x, y):
    torch._check(x.shape == y.shape and x.dtype == y.dtype and x.dim() >= 1,
                 lambda: "silu_mul: x and y must share a shape and dtype")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("ipex_lite::decode_attention")
def _decode_attention_fake(query, key, value, attn_mask=None, is_causal=False, scale=None):
    op = "decode_attention"
    for name, t in (("query", query), ("key", key), ("value", value)):
        torch._check(t.dim() == 4 and t.dtype == query.dtype and t.dtype in (torch.float32, torch.bfloat16),
                     lambda: f"{op}: {name} must be 4-D with query's dtype (float32 or bfloat16)")
    b, h, lq, e = query.shape
    torch._check(key.shape[0] == b and key.shape[3] == e and h % key.shape[1] == 0,
                 lambda: f"{op}: key {tuple(key.shape)} does not fit query {tuple(query.shape)}")
    torch._check(value.shape[:3] == key.shape[:3], lambda: f"{op}: value {tuple(value.shape)} does not fit key")
    return query.new_empty((b, lq, h, value.shape[3])).permute(0, 2, 1, 3)


# ---------------------------------------------------------------- weight-only quantized Linear

def _woq_rows(qweight, bits, in_features, group_size):
    kp = (in_features + 31) // 32 * 32
    group = kp if group_size <= 0 else group_size
    torch._check(bits in (4, 8), lambda: f"woq: bits must be 4 or 8, got {bits}")
    torch._check(group % 32 == 0 and kp % group == 0, lambda: f"woq: bad group_size {group_size}")
    torch._check(qweight.dim() == 2 and qweight.shape[1] == (kp if bits == 8 else kp // 2),
                 lambda: f"woq: qweight of shape {tuple(qweight.shape)} does not hold {in_features} inputs")
    return qweight.shape[0]


@torch.library.register_fake("ipex_lite::woq_linear")
def _woq_linear_fake(input, qweight, scales, zeros, bias, bits, in_features, group_size, lowp_int8=False,
                     codebook=None):
    n = _woq_rows(qweight, bits, in_features, group_size)
    torch._check(input.shape[-1] == in_features, lambda: f"woq_linear: input has {input.shape[-1]} features")
    return input.new_empty((*input.shape[:-1], n))


@torch.library.register_fake("ipex_lite::woq_dequantize")
def _woq_dequantize_fake(qweight, scales, zeros, bits, in_features, group_size, codebook=None):
    n = _woq_rows(qweight, bits, in_features, group_size)
    return qweight.new_empty((n, in_features), dtype=torch.bfloat16)
