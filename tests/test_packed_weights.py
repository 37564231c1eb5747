"""ipex_lite::packed_conv / packed_linear: the ops a traced optimized model records.

They run torch's oneDNN convolution / linear on a plain weight that they pack
on first use and cache per (weight storage and version, team size, input
shape)."""
import pytest
import torch
import torch.nn.functional as F

import ipex_lite  # noqa: F401  (registers the ops)

ops = torch.ops.ipex_lite
CL = torch.channels_last

POST = [("none", [], None, lambda t: t),
        ("relu", [], None, F.relu),
        ("gelu", [], "tanh", lambda t: F.gelu(t, approximate="tanh")),
        ("leaky_relu", [0.1], None, lambda t: F.leaky_relu(t, 0.1)),
        ("hardtanh", [0.0, 6.0], None, F.relu6)]


def conv_case(dims=2, groups=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    spatial = (9, 7) if dims == 2 else (5, 6, 4)
    x = torch.randn(3, 4 * groups, *spatial, generator=g)
    w = torch.randn(6 * groups, 4, *([3] * dims), generator=g)
    b = torch.randn(6 * groups, generator=g)
    return x, w, b


@pytest.mark.parametrize("attr,scalars,algo,fn", POST, ids=[p[0] for p in POST])
@pytest.mark.parametrize("dims,groups,stride,padding,dilation", [(2, 1, 1, 1, 1), (2, 2, 2, 0, 1), (2, 1, 1, 2, 2),
                                                                  (3, 1, 1, 1, 1)])
def test_conv_matches_torch(attr, scalars, algo, fn, dims, groups, stride, padding, dilation):
    x, w, b = conv_case(dims, groups)
    ref = fn((F.conv2d if dims == 2 else F.conv3d)(x, w, b, stride, padding, dilation, groups))
    for xin in (x, x.contiguous(memory_format=CL if dims == 2 else torch.channels_last_3d)):
        y = ops.packed_conv(xin, w, b, [padding] * dims, [stride] * dims, [dilation] * dims, groups, attr, scalars,
                            algo)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unary", [None, "relu"])
def test_conv_add_matches_torch(unary):
    x, w, b = conv_case()
    other = torch.randn(3, 6, 9, 7).contiguous(memory_format=CL)
    y = ops.packed_conv_add(x, other, w, None, [1, 1], [1, 1], [1, 1], 1, unary, [], None)
    ref = F.conv2d(x, w, None, 1, 1) + other
    torch.testing.assert_close(y, F.relu(ref) if unary else ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", [CL, torch.contiguous_format])
def test_conv_add_in_place_writes_the_sum_into_other(fmt):
    x, w, b = conv_case()
    other = torch.randn(3, 6, 9, 7).contiguous(memory_format=fmt)
    want = F.relu(F.conv2d(x, w, b, 1, 1) + other)
    assert ops.packed_conv_add_(other, x, w, b, [1, 1], [1, 1], [1, 1], 1, "relu", [], None) is None
    torch.testing.assert_close(other, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="same shape"):
        ops.packed_conv_add_(torch.randn(3, 6, 8, 7), x, w, b, [1, 1], [1, 1], [1, 1], 1, None, [], None)


def test_conv_bf16_within_rounding():
    x, w, b = conv_case()
    y = ops.packed_conv(x.bfloat16(), w.bfloat16(), b.bfloat16(), [1, 1], [1, 1], [1, 1], 1, "none", [], None)
    ref = F.conv2d(x.bfloat16().float(), w.bfloat16().float(), b.bfloat16().float(), 1, 1)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=2 ** -7, atol=2e-2)  # one bf16 rounding of the output


@pytest.mark.parametrize("shape", [(5, 64), (2, 7, 64)])
def test_linear_matches_torch(shape):
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(shape, generator=g), torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    for attr, scalars, algo, fn in POST:
        torch.testing.assert_close(ops.packed_linear(x, w, b, attr, scalars, algo), fn(F.linear(x, w, b)),
                                   rtol=1e-5, atol=1e-5)
    other = torch.randn(*shape[:-1], 48, generator=g)
    torch.testing.assert_close(ops.packed_linear_add(x, other, w, None), F.linear(x, w) + other, rtol=1e-5, atol=1e-5)
    xt = torch.randn(64, 5, generator=g).t()  # not contiguous
    torch.testing.assert_close(ops.packed_linear(xt, w, b, "none", [], None), F.linear(xt, w, b), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch built without MKL")
def test_linear_mkl_matches_torch():
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(2, 7, 64, generator=g), torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    torch.testing.assert_close(ops.packed_linear_mkl(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.packed_linear_mkl(x[0], w, None), F.linear(x[0], w), rtol=1e-5, atol=1e-5)
    ops.packed_linear(x, w, b, "none", [], None)  # a oneDNN pack of the same weight and rows: its own entry
    torch.testing.assert_close(ops.packed_linear_mkl(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.library.opcheck(ops.packed_linear_mkl, (x, w, b))
    with pytest.raises(RuntimeError, match="float32 only"):
        ops.packed_linear_mkl(x.bfloat16(), w.bfloat16(), None)
    with pytest.raises(RuntimeError, match="last dimension is 63, the weight expects 64"):
        ops.packed_linear_mkl(torch.randn(3, 63), w, None)


def test_opcheck():
    x, w, b = conv_case()
    other = torch.randn(3, 6, 9, 7).contiguous(memory_format=CL)
    torch.library.opcheck(ops.packed_conv, (x.contiguous(memory_format=CL), w, b, [1, 1], [1, 1], [1, 1], 1, "relu",
                                            [], None))
    torch.library.opcheck(ops.packed_conv_add, (x, other, w, b, [1, 1], [1, 1], [1, 1], 1, None, [], None))
    torch.library.opcheck(ops.packed_conv_add_, (other.clone(), x, w, b, [1, 1], [1, 1], [1, 1], 1, "relu", [],
                                                 None))
    x3, w3, b3 = conv_case(3)
    torch.library.opcheck(ops.packed_conv, (x3, w3, b3, [1] * 3, [2] * 3, [1] * 3, 1, "none", [], None))
    xl, wl = torch.randn(2, 5, 16), torch.randn(8, 16)
    torch.library.opcheck(ops.packed_linear, (xl, wl, None, "gelu", [], "none"))
    torch.library.opcheck(ops.packed_linear_add, (xl, torch.randn(2, 5, 8), wl, torch.randn(8)))


def test_the_cache_follows_the_weight():
    x, w, b = conv_case()
    args = ([1, 1], [1, 1], [1, 1], 1, "none", [], None)
    first = ops.packed_conv(x, w, b, *args)
    w.mul_(2)  # in place: a new version, so a new pack
    torch.testing.assert_close(ops.packed_conv(x, w, b, *args), F.conv2d(x, w, b, 1, 1), rtol=1e-5, atol=1e-5)
    w2 = w / 2  # another tensor with the first values
    torch.testing.assert_close(ops.packed_conv(x, w2, b, *args), first, rtol=1e-5, atol=1e-5)
    x2 = torch.randn(1, 4, 12, 5)  # another input shape
    torch.testing.assert_close(ops.packed_conv(x2, w, b, *args), F.conv2d(x2, w, b, 1, 1), rtol=1e-5, atol=1e-5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # another team size: its own pack
        torch.testing.assert_close(ops.packed_conv(x, w, b, *args), F.conv2d(x, w, b, 1, 1), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)
    flat = torch.randn(8 * 16)
    for rows in (8, 4):  # two views of one storage at the same offset: two packs
        wv = flat[:rows * 16].view(rows, 16)
        xv = torch.randn(3, 16)
        torch.testing.assert_close(ops.packed_linear(xv, wv, None, "none", [], None), F.linear(xv, wv), rtol=1e-5,
                                   atol=1e-5)
    xl, wl = torch.randn(3, 16), torch.randn(8, 16)
    ops.packed_linear(xl, wl, None, "none", [], None)
    wl.add_(1)
    torch.testing.assert_close(ops.packed_linear(xl, wl, None, "none", [], None), F.linear(xl, wl), rtol=1e-5,
                               atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    x, w, b = conv_case()
    args = ([1, 1], [1, 1], [1, 1], 1, "none", [], None)
    with pytest.raises(RuntimeError, match="must both be float32 or both bfloat16"):
        ops.packed_conv(x.double(), w.double(), None, *args)
    with pytest.raises(RuntimeError, match="must both be float32 or both bfloat16"):
        ops.packed_conv(x.bfloat16(), w, None, *args)
    with pytest.raises(RuntimeError, match="input has 8 channels, the weight expects 4"):
        ops.packed_conv(torch.randn(1, 8, 5, 5), w, None, *args)
    with pytest.raises(RuntimeError, match="weight must be a dense CPU tensor with 4 dims"):
        ops.packed_conv(x, w[0], None, *args)
    with pytest.raises(RuntimeError, match="input must be 4-D or 5-D"):
        ops.packed_conv(torch.randn(4, 9), torch.randn(6, 4), None, *args)
    with pytest.raises(RuntimeError, match="other must have the input's dtype"):
        ops.packed_conv_add(x, torch.randn(3, 6, 9, 7).double(), w, None, [1, 1], [1, 1], [1, 1], 1, None, [], None)
    with pytest.raises(RuntimeError, match="last dimension is 15, the weight expects 16"):
        ops.packed_linear(torch.randn(3, 15), torch.randn(8, 16), None, "none", [], None)
    with pytest.raises(RuntimeError, match="weight must be a dense CPU tensor with 2 dims"):
        ops.packed_linear(torch.randn(3, 16), torch.randn(8, 16, 1), None, "none", [], None)


def test_inputs_that_need_gradients_are_refused():
    x, w, b = conv_case()
    with pytest.raises(RuntimeError, match="derivative|autograd|not implemented"):
        ops.packed_conv(x, w.requires_grad_(), b, [1, 1], [1, 1], [1, 1], 1, "none", [], None).sum().backward()
