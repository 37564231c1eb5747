"""DLRM dot interaction: ipex_lite vs the stock bmm + tril reference.

    python bench/interaction.py [--batch 2048 --features 27 --dim 128] [--no-compile] [--json]

Systems: stock eager (reference), torch.compile of the same reference
(inductor), IPEX's interaction when intel_extension_for_pytorch imports, and
ipex_lite.  Forward and forward+backward, fp32 and bf16.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import Report, add_common_args, import_ipex, measure, setup_from_args  # noqa: E402

import ipex_lite  # noqa: E402
from ipex_lite.nn.functional import interaction  # noqa: E402


def stock_interaction(xs):
    batch, dim = xs[0].shape
    n = len(xs)
    t = torch.cat(xs, dim=1).view(batch, n, dim)
    z = torch.bmm(t, t.transpose(1, 2))
    li, lj = torch.tril_indices(n, n, offset=-1, device=t.device)
    return torch.cat([xs[0], z[:, li, lj]], dim=1)


def systems(args):
    out = {"stock": stock_interaction}
    if args.compile:
        out["torch.compile"] = torch.compile(stock_interaction, dynamic=False)
    ipex = import_ipex()
    if ipex is not None:
        out["ipex"] = lambda xs: ipex.nn.functional.interaction(*xs)
    out["ipex_lite"] = lambda xs: interaction(*xs)
    return out


def main(argv=None):
    parser = add_common_args(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--features", type=int, default=27)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args(argv)
    setup_from_args(args)
    torch.manual_seed(0)
    report = Report(f"interaction B={args.batch} N={args.features} D={args.dim}", reference="stock")
    fns_by_system = systems(args)
    n, d, b = args.features, args.dim, args.batch
    for dt_name in args.dtypes.split(","):
        dtype = getattr(torch, dt_name)
        xs = [torch.randn(b, d, dtype=dtype) for _ in range(n)]
        xs_g = [x.clone().requires_grad_(True) for x in xs]
        out_elems = b * (d + n * (n - 1) // 2)
        grad = torch.randn(b, d + n * (n - 1) // 2, dtype=dtype)

        def fwd(fn):
            def run():
                with torch.no_grad():
                    return fn(xs)
            return run

        def fwd_bwd(fn):
            def run():
                y = fn(xs_g)
                y.backward(grad)
                for x in xs_g:
                    x.grad = None
            return run

        esize = xs[0].element_size()
        bytes_fwd = (n * b * d + out_elems) * esize
        bytes_fb = bytes_fwd + (out_elems + 2 * n * b * d) * esize
        for label, wrap, nbytes in (("forward", fwd, bytes_fwd), ("forward+backward", fwd_bwd, bytes_fb)):
            res = measure({s: wrap(f) for s, f in fns_by_system.items()}, repeat=args.repeat, warmup=args.warmup)
            gbs = {s: {"GB/s": nbytes / (r["median_ms"] * 1e-3) / 1e9} for s, r in res.items()}
            report.add(f"{label} {dt_name}", res, gbs)
    notes = [f"ipex_lite ISA level: {ipex_lite.cpu_capability()}",
             "GB/s counts the unavoidable traffic: inputs + output (+ grad_out and input grads for backward)"]
    if "ipex" not in fns_by_system:
        notes.append("IPEX not importable in this environment (it needs torch 2.8): column absent")
    report.emit(args.json, notes)


if __name__ == "__main__":
    main()
