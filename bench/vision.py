"""Detection ops: ipex_lite ROIAlign and FrozenBatchNorm2d vs straightforward PyTorch.

    python bench/vision.py [--quick] [--json]

ROIAlign: an FPN-level feature map (2 x 256 x 50 x 68), 512 boxes, 7x7 bins,
sampling_ratio 2, aligned=True, forward and forward+backward, NCHW and
channels_last.  The reference is the vectorised PyTorch formulation (all
sample points at once, four gathers, weighted sum, mean over samples;
autograd for the backward).  torchvision's kernel is added when it imports.
FrozenBatchNorm2d: torchvision's formula (scale and shift vectors, then
x * scale + shift) on 8 x 256 x 56 x 56.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import Report, add_common_args, measure, setup_from_args  # noqa: E402

import ipex_lite  # noqa: E402
from ipex_lite.nn.functional import roi_align  # noqa: E402


def torch_roi_align(x, rois, out_size, spatial_scale, sampling_ratio, aligned):
    """Vectorised ROIAlign in plain PyTorch (fixed sampling_ratio > 0)."""
    n, c, h, w = x.shape
    ph, pw, g = out_size, out_size, sampling_ratio
    off = 0.5 if aligned else 0.0
    b = rois[:, 0].long()
    x1, y1 = rois[:, 1] * spatial_scale - off, rois[:, 2] * spatial_scale - off
    rw, rh = rois[:, 3] * spatial_scale - off - x1, rois[:, 4] * spatial_scale - off - y1
    if not aligned:
        rw, rh = rw.clamp(min=1), rh.clamp(min=1)
    steps_h = (torch.arange(ph).view(-1, 1) + (torch.arange(g).view(1, -1) + 0.5) / g).flatten()  # (ph*g)
    steps_w = (torch.arange(pw).view(-1, 1) + (torch.arange(g).view(1, -1) + 0.5) / g).flatten()
    ys = y1.view(-1, 1) + steps_h.view(1, -1) * (rh / ph).view(-1, 1)  # (K, ph*g)
    xs = x1.view(-1, 1) + steps_w.view(1, -1) * (rw / pw).view(-1, 1)  # (K, pw*g)
    valid = ((ys >= -1) & (ys <= h)).unsqueeze(2) & ((xs >= -1) & (xs <= w)).unsqueeze(1)
    ys, xs = ys.clamp(min=0), xs.clamp(min=0)
    yl, xl = ys.floor().clamp(max=h - 1), xs.floor().clamp(max=w - 1)
    ys = torch.where(yl >= h - 1, yl, ys)
    xs = torch.where(xl >= w - 1, xl, xs)
    yh, xh = (yl + 1).clamp(max=h - 1), (xl + 1).clamp(max=w - 1)
    ly, lx = ys - yl, xs - xl
    flat = x.permute(1, 0, 2, 3).reshape(c, -1)  # (C, N*H*W): one gather per tap, no per-box copies

    def tap(yi, xi):
        idx = (b.view(-1, 1, 1) * (h * w) + yi.long().unsqueeze(2) * w + xi.long().unsqueeze(1)).flatten()
        return flat[:, idx].view(c, -1, yi.shape[1], xi.shape[1]).transpose(0, 1)
    wy1, wy0 = ly.unsqueeze(2), (1 - ly).unsqueeze(2)
    wx1, wx0 = lx.unsqueeze(1), (1 - lx).unsqueeze(1)
    v = (tap(yl, xl) * (wy0 * wx0).unsqueeze(1) + tap(yl, xh) * (wy0 * wx1).unsqueeze(1)
         + tap(yh, xl) * (wy1 * wx0).unsqueeze(1) + tap(yh, xh) * (wy1 * wx1).unsqueeze(1))
    v = v * valid.unsqueeze(1)
    return v.view(-1, c, ph, g, pw, g).mean((3, 5))


def main(argv=None):
    parser = add_common_args(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    setup_from_args(args)
    torch.manual_seed(0)
    report = Report("detection ops", reference="torch reference")
    x = torch.randn(2, 256, 50, 68)
    k = 512
    xy = torch.rand(k, 2) * torch.tensor([68 * 8.0, 50 * 8.0])
    wh = torch.rand(k, 2) * 160 + 8
    rois = torch.cat([torch.randint(0, 2, (k, 1)).float(), xy, xy + wh], 1)
    args_ra = (7, 0.125, 2, True)
    want = torch_roi_align(x, rois, *args_ra)
    got = roi_align(x, rois, 7, 0.125, 2, True)
    err = (got - want).abs().max().item()
    try:
        import torchvision.ops as tvo
    except ImportError:
        tvo = None
    for layout in ("nchw", "channels_last"):
        xi = x if layout == "nchw" else x.contiguous(memory_format=torch.channels_last)
        fns = {"torch reference": lambda: torch_roi_align(xi, rois, *args_ra),
               "ipex_lite": lambda: roi_align(xi, rois, 7, 0.125, 2, True)}
        if tvo is not None:
            fns["torchvision"] = lambda: tvo.roi_align(xi, rois, 7, 0.125, 2, True)
        with torch.no_grad():
            report.add(f"roi_align fwd {layout}", measure(fns, repeat=args.repeat, warmup=args.warmup))
        xg = xi.detach().clone().requires_grad_()

        def fwd_bwd(fn):
            def run():
                xg.grad = None
                fn(xg).sum().backward()
            return run
        fb = {"torch reference": fwd_bwd(lambda t: torch_roi_align(t, rois, *args_ra)),
              "ipex_lite": fwd_bwd(lambda t: roi_align(t, rois, 7, 0.125, 2, True))}
        if tvo is not None:
            fb["torchvision"] = fwd_bwd(lambda t: tvo.roi_align(t, rois, 7, 0.125, 2, True))
        report.add(f"roi_align fwd+bwd {layout}", measure(fb, repeat=args.repeat, warmup=args.warmup))

    m = ipex_lite.nn.FrozenBatchNorm2d(256)
    m.running_var.uniform_(0.5, 1.5)
    xb = torch.randn(8, 256, 56, 56)

    def tv_frozen(t):
        scale = m.weight * (m.running_var + m.eps).rsqrt()
        shift = m.bias - m.running_mean * scale
        return t * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    for layout in ("nchw", "channels_last"):
        xi = xb if layout == "nchw" else xb.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            report.add(f"FrozenBatchNorm2d {layout}", measure({"torch reference": lambda: tv_frozen(xi),
                                                               "ipex_lite": lambda: m(xi)},
                                                              repeat=args.repeat, warmup=args.warmup))
    report.emit(args.json, [f"roi_align ipex_lite vs reference: max |diff| {err:.1e}",
                            "torchvision " + ("compared" if tvo is not None else "not importable here: not compared")])


if __name__ == "__main__":
    main()
