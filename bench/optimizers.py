"""Optimizer step alone: ipex_lite fused steps vs torch.optim (fused=True) fp32.

    python bench/optimizers.py [--params 100000000] [--json]

For each optimizer: torch fused=True on fp32 parameters (reference), the
ipex_lite fused fp32 step, and the ipex_lite split-BF16 step (bf16 top +
trail, bf16 gradient).  GB/s counts the bytes each step must read and write
once (parameter halves or fp32 weight, gradient, optimizer state).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import Report, add_common_args, measure, setup_from_args  # noqa: E402

from ipex_lite import optim as lo  # noqa: E402

OPTIMIZERS = {
    "SGD momentum": (torch.optim.SGD, lo.SGD, dict(lr=0.01, momentum=0.9), 1),
    "Adagrad": (torch.optim.Adagrad, lo.Adagrad, dict(lr=0.01), 1),
    "Adam": (torch.optim.Adam, lo.Adam, dict(lr=1e-3), 2),
    "AdamW": (torch.optim.AdamW, lo.AdamW, dict(lr=1e-3, weight_decay=0.01), 2),
}


def main(argv=None):
    parser = add_common_args(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--only", default=",".join(OPTIMIZERS))
    parser.add_argument("--no-whole-step", dest="whole_step", action="store_false")
    args = parser.parse_args(argv)
    setup_from_args(args)
    n = args.params
    report = Report(f"optimizer step, {n / 1e6:.0f}M parameters", reference="torch fused fp32")
    for name in args.only.split(","):
        ref_cls, lite_cls, kw, states = OPTIMIZERS[name]
        p_ref = torch.nn.Parameter(torch.randn(n))
        p_lite = torch.nn.Parameter(p_ref.detach().clone())
        p_split = torch.nn.Parameter(p_ref.detach().clone())
        p_ref.grad = torch.randn(n)
        p_lite.grad = p_ref.grad.clone()
        o_ref = ref_cls([p_ref], fused=True, **kw)
        o_lite = lite_cls([p_lite], **kw)
        o_split = lite_cls([p_split], **kw)
        lo.split_master_weights_(o_split)
        p_split.grad = p_ref.grad.bfloat16()
        res = measure({"torch fused fp32": o_ref.step, "ipex_lite fp32": o_lite.step,
                       "ipex_lite split-bf16": o_split.step}, repeat=args.repeat, warmup=args.warmup, inner=1)
        # read + write: weight (4 B) and states (4 B each); read: grad (4 B fp32, 2 B bf16)
        fp32_bytes = n * (2 * 4 + 2 * 4 * states + 4)
        split_bytes = n * (2 * 4 + 2 * 4 * states + 2)
        extra = {s: {"GB/s": (split_bytes if "split" in s else fp32_bytes) / (r["median_ms"] * 1e-3) / 1e9}
                 for s, r in res.items()}
        report.add(name, res, extra)
        del p_ref, p_lite, p_split, o_ref, o_lite, o_split
    if args.whole_step:
        whole_step(report, args)
    report.emit(args.json, ["split-bf16: 4 bytes per parameter (bf16 top + trail) with a bf16 gradient",
                            "whole step: 25M-parameter MLP, batch 256, bf16 autocast forward/backward + AdamW"])


def whole_step(report, args):
    """Forward + backward + AdamW update of a 25M-parameter MLP under bf16 autocast:
    stock (fp32 weights, torch fused AdamW) vs ipex_lite.optimize(bf16) with the
    separate fused step and with the update inside backward."""
    import copy

    import ipex_lite
    from torch import nn

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                         nn.Linear(4096, 1024), nn.ReLU(), nn.Linear(1024, 1))
    x, y = torch.randn(256, 1024), torch.randn(256, 1)
    stock = copy.deepcopy(base)
    stock_opt = torch.optim.AdamW(stock.parameters(), lr=1e-4, fused=True)
    m1 = copy.deepcopy(base)
    m1, o1 = ipex_lite.optimize(m1, dtype=torch.bfloat16, optimizer=torch.optim.AdamW(m1.parameters(), lr=1e-4),
                                inplace=True)
    m2 = copy.deepcopy(base)
    m2, o2 = ipex_lite.optimize(m2, dtype=torch.bfloat16, optimizer=torch.optim.AdamW(m2.parameters(), lr=1e-4),
                                inplace=True, fuse_update_step=True)

    def step(model, opt):
        def run():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = (model(x).float() - y).pow(2).mean()
            loss.backward()
            opt.step()
        return run

    res = measure({"torch fused fp32": step(stock, stock_opt), "ipex_lite split-bf16": step(m1, o1),
                   "ipex_lite update-in-backward": step(m2, o2)}, repeat=args.repeat, warmup=args.warmup, inner=1)
    report.add("whole step, 25M MLP, AdamW", res)


if __name__ == "__main__":
    main()
