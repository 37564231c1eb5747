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


@torch.library.register_fake("ipex_lite::interaction_backward")
def _interaction_backward_fake(grad_out, inputs):
    _check_interaction_inputs("interaction_backward", inputs)
    n = len(inputs)
    batch, dim = inputs[0].shape
    want = (batch, dim + n * (n - 1) // 2)
    torch._check(tuple(grad_out.shape) == want,
                 lambda: f"interaction_backward: grad_out must have shape {want}, got {tuple(grad_out.shape)}")
    torch._check(grad_out.dtype == inputs[0].dtype,
                 lambda: f"interaction_backward: grad_out has dtype {grad_out.dtype} but the inputs have {inputs[0].dtype}")
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in inputs]


def _interaction_setup_context(ctx, inputs, output):
    (tensors,) = inputs
    ctx.save_for_backward(*tensors)


def _interaction_backward(ctx, grad_out):
    tensors = list(ctx.saved_tensors)
    grads = ops.interaction_backward(grad_out.to(tensors[0].dtype), tensors)
    return (list(grads),)


torch.library.register_autograd("ipex_lite::interaction_forward", _interaction_backward,
                                setup_context=_interaction_setup_context)
