"""FrozenBatchNorm2d and ROIAlign: parity with the formula / a straightforward
PyTorch ROIAlign written here (torchvision's semantics), gradcheck, opcheck,
channels_last, bf16, every ISA level, bad inputs, folding by optimize()."""
import math
import textwrap

import pytest
import torch
from torch import nn

import ipex_lite
from ipex_lite.nn import FrozenBatchNorm2d, RoIAlign
from ipex_lite.nn.functional import roi_align
from isa_levels import run_at_every_level

ops = torch.ops.ipex_lite


def frozen_bn(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = FrozenBatchNorm2d(n, eps=1e-3)
    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
    m.bias.copy_(torch.randn(n, generator=g))
    m.running_mean.copy_(torch.randn(n, generator=g))
    m.running_var.copy_(torch.rand(n, generator=g) + 0.2)
    return m


def bn_formula(m, x):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return ((x.double() - m.running_mean.double().view(shape)) / torch.sqrt(m.running_var.double().view(shape) + m.eps)
            * m.weight.double().view(shape) + m.bias.double().view(shape))


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "3d"])
def test_frozen_bn_matches_formula(layout):
    m = frozen_bn()
    x = torch.randn(3, 6, 5, 7) if layout != "3d" else torch.randn(3, 6, 11)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y = m(x)
    torch.testing.assert_close(y.double(), bn_formula(m, x), rtol=1e-5, atol=1e-5)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    yb = m(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.double(), bn_formula(m, x.bfloat16().float()), rtol=2e-2, atol=2e-2)


def test_frozen_bn_gradients_opcheck_and_state_dict():
    m = frozen_bn()
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t), (x,))
    xf = torch.randn(2, 6, 4, 4, requires_grad=True)
    m(xf).sum().backward()
    scale = m.weight / torch.sqrt(m.running_var + m.eps)
    torch.testing.assert_close(xf.grad, scale.view(1, -1, 1, 1).expand_as(xf))
    torch.library.opcheck(ops.frozen_batch_norm, (torch.randn(2, 6, 3, 3), m.weight, m.bias, m.running_mean,
                                                  m.running_var, 1e-3))
    bn = nn.BatchNorm2d(6)
    fresh = FrozenBatchNorm2d(6)
    fresh.load_state_dict(bn.state_dict())  # num_batches_tracked dropped, as torchvision's does
    assert set(fresh.state_dict()) == {"weight", "bias", "running_mean", "running_var"}


def test_frozen_bn_bad_inputs_and_folding():
    m = frozen_bn()
    with pytest.raises(RuntimeError, match="shape"):
        ops.frozen_batch_norm(torch.randn(2, 5, 3, 3), m.weight, m.bias, m.running_mean, m.running_var, 1e-3)
    with pytest.raises(RuntimeError, match="channel"):
        ops.frozen_batch_norm(torch.randn(5), m.weight, m.bias, m.running_mean, m.running_var, 1e-3)
    with pytest.raises(RuntimeError, match="float32"):
        ops.frozen_batch_norm(torch.ones(2, 6, 2, 2, dtype=torch.int32), m.weight, m.bias, m.running_mean,
                              m.running_var, 1e-3)
    assert m(torch.randn(0, 6, 3, 3)).shape == (0, 6, 3, 3)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), frozen_bn(), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    opt = ipex_lite.optimize(model)
    assert "FrozenBatchNorm2d folded" in ipex_lite.explain(opt)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- ROIAlign
def ref_roi_align(x, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """torchvision's ROIAlign written plainly (double, loops over rois/bins, vectorised over channels)."""
    x = x.double()
    ph_n, pw_n = output_size
    n_, c, h, w = x.shape
    out = torch.zeros(rois.shape[0], c, ph_n, pw_n, dtype=torch.float64)
    off = 0.5 if aligned else 0.0
    for k, roi in enumerate(rois.double().tolist()):
        b = int(roi[0])
        x1, y1 = roi[1] * spatial_scale - off, roi[2] * spatial_scale - off
        rw, rh = roi[3] * spatial_scale - off - x1, roi[4] * spatial_scale - off - y1
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / ph_n, rw / pw_n
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / ph_n)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / pw_n)
        count = max(gh * gw, 1)
        for ph in range(ph_n):
            for pw in range(pw_n):
                acc = torch.zeros(c, dtype=torch.float64)
                for iy in range(gh):
                    yy = y1 + ph * bh + (iy + 0.5) * bh / gh
                    for ix in range(gw):
                        xx = x1 + pw * bw + (ix + 0.5) * bw / gw
                        if yy < -1 or yy > h or xx < -1 or xx > w:
                            continue
                        yy_, xx_ = max(yy, 0.0), max(xx, 0.0)
                        yl, xl = int(yy_), int(xx_)
                        if yl >= h - 1:
                            yl = yh = h - 1
                            yy_ = float(yl)
                        else:
                            yh = yl + 1
                        if xl >= w - 1:
                            xl = xh = w - 1
                            xx_ = float(xl)
                        else:
                            xh = xl + 1
                        ly, lx = yy_ - yl, xx_ - xl
                        hy, hx = 1 - ly, 1 - lx
                        acc += (hy * hx * x[b, :, yl, xl] + hy * lx * x[b, :, yl, xh] + ly * hx * x[b, :, yh, xl]
                                + ly * lx * x[b, :, yh, xh])
                out[k, :, ph, pw] = acc / count
    return out


def make_rois(k=6, n=2, h=10, w=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (k, 1), generator=g).float()
    xy = torch.rand(k, 2, generator=g) * torch.tensor([w * 1.2, h * 1.2]) - 2  # some start outside
    wh = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    return torch.cat([idx, xy, xy + wh], dim=1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_roi_align_matches_reference(aligned, sampling_ratio, channels_last):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 10, 12)
    rois = make_rois()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    got = roi_align(x, rois, (3, 4), spatial_scale=0.8, sampling_ratio=sampling_ratio, aligned=aligned)
    want = ref_roi_align(x, rois, (3, 4), 0.8, sampling_ratio, aligned)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert got.is_contiguous(memory_format=fmt)  # IPEX's test: channels_last in, channels_last out
    gb = roi_align(x.bfloat16(), rois, (3, 4), 0.8, sampling_ratio, aligned)
    assert gb.dtype == torch.bfloat16
    assert gb.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(gb.double(), ref_roi_align(x.bfloat16(), rois, (3, 4), 0.8, sampling_ratio, aligned),
                               rtol=2e-2, atol=2e-2)


def test_roi_align_box_list_module_and_empty():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    boxes = [torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.tensor([[1.0, 1.0, 7.0, 6.0], [2.0, 0.5, 3.0, 7.5]])]
    rois = torch.tensor([[0, 0.0, 0.0, 4.0, 4.0], [1, 1.0, 1.0, 7.0, 6.0], [1, 2.0, 0.5, 3.0, 7.5]])
    torch.testing.assert_close(roi_align(x, boxes, 2), roi_align(x, rois, 2))
    mod = RoIAlign((2, 2), 1.0, 2, aligned=True)
    torch.testing.assert_close(mod(x, rois), roi_align(x, rois, 2, 1.0, 2, True))
    assert roi_align(x, torch.zeros(0, 5), 3).shape == (0, 3, 3, 3)


@pytest.mark.parametrize("channels_last", [False, True])
def test_roi_align_gradcheck_and_opcheck(channels_last):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    rois = make_rois(k=4, h=6, w=7).double()
    for aligned in (False, True):
        assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, (2, 3), 0.9, -1, aligned), (x,))
    xf = torch.randn(2, 3, 6, 7)
    if channels_last:
        xf = xf.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(ops.roi_align_forward, (xf, make_rois(k=4, h=6, w=7), 0.9, 2, 3, 2, True))
    grad = torch.randn(4, 3, 2, 3)
    if channels_last:
        grad = grad.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(ops.roi_align_backward, (grad, make_rois(k=4, h=6, w=7), 0.9, 2, 3, 2, 3, 6, 7, 2, True,
                                                   channels_last))


def test_roi_align_bad_inputs():
    x = torch.randn(2, 3, 8, 8)
    for rois, msg in ((torch.tensor([[2.0, 0, 0, 4, 4]]), "batch index"),
                      (torch.tensor([[-1.0, 0, 0, 4, 4]]), "batch index"),
                      (torch.tensor([[0.5, 0, 0, 4, 4]]), "whole numbers"),
                      (torch.tensor([[0.0, float("nan"), 0, 4, 4]]), "NaN"),
                      (torch.tensor([[0.0, 0, 0, float("inf"), 4]]), "NaN or infinite")):
        with pytest.raises(RuntimeError, match=msg):
            roi_align(x, rois, 2)
    ok = torch.tensor([[0.0, 0, 0, 4, 4]])
    with pytest.raises(RuntimeError, match="output_size"):
        roi_align(x, ok, (0, 2))
    with pytest.raises(RuntimeError, match="spatial_scale"):
        roi_align(x, ok, 2, spatial_scale=0.0)
    with pytest.raises(ValueError, match="\\(K, 5\\)"):
        roi_align(x, torch.zeros(3, 4), 2)
    with pytest.raises(ValueError, match="boxes\\[0\\]"):
        roi_align(x, [torch.zeros(3, 5)], 2)
    with pytest.raises(RuntimeError, match="\\(N, C, H, W\\)"):
        roi_align(torch.randn(3, 8, 8), ok, 2)
    with pytest.raises(RuntimeError, match="float32"):
        roi_align(x.int(), ok, 2)


_LEVEL_SCRIPT = textwrap.dedent("""
    import json, torch, ipex_lite
    from ipex_lite.nn.functional import roi_align
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 9, 9, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    rois = torch.tensor([[0, 1.0, 1.0, 7.0, 8.0], [1, 0.0, 2.0, 5.5, 4.0]])
    y = roi_align(x, rois, 3, 1.0, 2, True)
    y.backward(torch.ones_like(y))
    m = ipex_lite.nn.FrozenBatchNorm2d(16)
    m.running_var.fill_(4.0)
    z = m(x.detach())
    print(json.dumps({"level": ipex_lite.cpu_capability(), "y": y.double().sum().item(),
                      "g": x.grad.double().sum().item(), "z": z.double().sum().item()}))
""")


def test_every_isa_level_agrees():
    results = run_at_every_level(_LEVEL_SCRIPT)
    for r in results[1:]:
        for key in ("y", "g", "z"):
            assert abs(r[key] - results[0][key]) <= 1e-4 * (1 + abs(results[0][key])), (r, results[0])


# ---------------------------------------------------------------- parity with torchvision itself

def _torchvision():
    return pytest.importorskip("torchvision", reason="torchvision is not installed beside this torch")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_frozen_bn_matches_torchvision_value_and_gradient(layout):
    tv = _torchvision()
    theirs = tv.ops.misc.FrozenBatchNorm2d(6, eps=1e-5)
    mine = FrozenBatchNorm2d(6, eps=1e-5)
    g = torch.Generator().manual_seed(3)
    state = {"weight": torch.rand(6, generator=g) + 0.5, "bias": torch.randn(6, generator=g),
             "running_mean": torch.randn(6, generator=g), "running_var": torch.rand(6, generator=g) + 0.1}
    theirs.load_state_dict(state)
    mine.load_state_dict(theirs.state_dict())
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        theirs_d, mine_d = theirs.to(dtype), mine.to(dtype)
        x = torch.randn(3, 6, 5, 7, dtype=dtype, generator=g).contiguous(memory_format=fmt)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = theirs_d(xa), mine_d(xb)
        torch.testing.assert_close(yb, ya, rtol=tol, atol=tol)
        grad = torch.randn_like(ya)
        ya.backward(grad)
        yb.backward(grad)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_roi_align_matches_torchvision_value_and_gradient(aligned, sampling_ratio, channels_last):
    tv = _torchvision()
    torch.manual_seed(1)
    x = torch.randn(2, 5, 10, 12, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rois = make_rois(k=7).double()
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(2)]  # the list-of-boxes form too
    for theirs_in, mine_in in ((rois, rois), (boxes, boxes)):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = tv.ops.roi_align(xa, theirs_in, (3, 4), 0.8, sampling_ratio, aligned)
        yb = roi_align(xb, mine_in, (3, 4), 0.8, sampling_ratio, aligned)
        torch.testing.assert_close(yb, ya.contiguous(memory_format=torch.channels_last if channels_last
                                                     else torch.contiguous_format), rtol=1e-10, atol=1e-10)
        grad = torch.randn_like(ya)
        ya.backward(grad)
        yb.backward(grad)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-10, atol=1e-10)
    module = RoIAlign((3, 4), 0.8, sampling_ratio, aligned)
    theirs = tv.ops.RoIAlign((3, 4), 0.8, sampling_ratio, aligned)
    xf = x.float()
    torch.testing.assert_close(module(xf, rois.float()), theirs(xf, rois.float()), rtol=1e-5, atol=1e-5)
