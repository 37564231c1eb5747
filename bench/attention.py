"""Inference attention: ipex_lite's kernel vs torch's scaled_dot_product_attention.

    python bench/attention.py [--batch 8 --heads 12 --length 128 --head-dim 64] [--json]

BERT-base shapes by default: q, k and v are (B, H, L, E) views of (B, L, H, E)
projections, as in a Hugging Face layer.  fp32 and bf16, with and without a
padding mask; GFLOP/s counts the two matrix products.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import Report, add_common_args, measure, setup_from_args  # noqa: E402

import ipex_lite  # noqa: E402
from ipex_lite.nn.functional import scaled_dot_product_attention  # noqa: E402


def main(argv=None):
    parser = add_common_args(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args(argv)
    setup_from_args(args)
    torch.manual_seed(0)
    b, h, n, e = args.batch, args.heads, args.length, args.head_dim
    report = Report(f"attention B={b} H={h} L={n} E={e}", reference="torch sdpa")
    flops = 2 * 2 * b * h * n * n * e
    mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
    mask[0, ..., n // 2:] = False
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(b, n, h, e).to(dtype).transpose(1, 2) for _ in range(3))
        for label, m in (("no mask", None), ("padding mask", mask)):
            fns = {"torch sdpa": lambda m=m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                   "ipex_lite": lambda m=m: scaled_dot_product_attention(q, k, v, attn_mask=m)}
            with torch.no_grad():
                ref, out = (f() for f in fns.values())
                torch.testing.assert_close(out, ref, atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0)
                res = measure(fns, repeat=args.repeat, warmup=args.warmup)
            report.add(f"{label} {str(dtype).split('.')[-1]}", res,
                       {s: {"GFLOP/s": flops / (r["median_ms"] * 1e-3) / 1e9} for s, r in res.items()})
    report.emit(args.json, [f"ipex_lite ISA level: {ipex_lite.cpu_capability()}",
                            "outputs checked against torch before timing (fp32 1e-5, bf16 2e-2)"])


if __name__ == "__main__":
    main()
