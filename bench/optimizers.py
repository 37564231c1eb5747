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
    # name: (reference, ipex_lite class, hyperparameters, fp32 states, bytes per parameter of a second pass)
    "SGD momentum": (torch.optim.SGD, lo.SGD, dict(lr=0.01, momentum=0.9), 1, 0),
    "Adagrad": (torch.optim.Adagrad, lo.Adagrad, dict(lr=0.01), 1, 0),
    "Adam": (torch.optim.Adam, lo.Adam, dict(lr=1e-3), 2, 0),
    "AdamW": (torch.optim.AdamW, lo.AdamW, dict(lr=1e-3, weight_decay=0.01), 2, 0),
    # torch has no Lamb: the reference row is torch's fused Adam.  Lamb needs the
    # norms before the update, so a second pass reads weight and moments and writes the weight.
    "Lamb": (torch.optim.Adam, lo.Lamb, dict(lr=1e-3), 2, 4 + 8 + 4),
}


def main(argv=None):
    parser = add_common_args(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--only", default=",".join(OPTIMIZERS),
                        help="comma-separated, case-insensitive: " + ", ".join(OPTIMIZERS) + " (empty: whole step only)")
    parser.add_argument("--no-whole-step", dest="whole_step", action="store_false")
    args = parser.parse_args(argv)
    by_lower = {k.lower(): k for k in OPTIMIZERS}
    names = [by_lower.get(s.strip().lower()) for s in filter(None, args.only.split(","))]
    if None in names:
        parser.error(f"--only takes names from: {', '.join(OPTIMIZERS)}")
    setup_from_args(args)
    n = args.params
    report = Report(f"optimizer step, {n / 1e6:.0f}M parameters", reference="torch fused fp32")
    for name in names:  # --only "" times the whole step alone
        ref_cls, lite_cls, kw, states, second_pass = OPTIMIZERS[name]
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
        moved = {"torch fused fp32": fp32_bytes, "ipex_lite fp32": fp32_bytes + n * second_pass,
                 "ipex_lite split-bf16": split_bytes + n * second_pass}
        extra = {s: {"GB/s": moved[s] / (r["median_ms"] * 1e-3) / 1e9} for s, r in res.items()}
        report.add(name, res, extra)
        del p_ref, p_lite, p_split, o_ref, o_lite, o_split
    if args.whole_step:
        whole_step(report, args)
    report.emit(args.json, ["split-bf16: 4 bytes per parameter (bf16 top + trail) with a bf16 gradient",
                            "Lamb: torch has none; its reference column is torch's fused Adam",
                            "whole step: 25M-parameter MLP, batch 256, bf16 autocast forward/backward + AdamW; "
                            "peak MB: RSS growth over 3 steps, one fresh process per mode"])


WHOLE_STEP_MODES = ("torch fused fp32", "ipex_lite fp32 master", "ipex_lite split-bf16",
                    "ipex_lite update-in-backward")


def _whole_step_fn(mode):
    """One training step (forward + backward + AdamW) of a 25M-parameter MLP
    under bf16 autocast, in one of WHOLE_STEP_MODES."""
    import ipex_lite
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                          nn.Linear(4096, 1024), nn.ReLU(), nn.Linear(1024, 1))
    x, y = torch.randn(256, 1024), torch.randn(256, 1)
    if mode == "torch fused fp32":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    elif mode == "ipex_lite fp32 master":  # fp32 weights, fused step; autocast makes the bf16 copies
        opt = lo.AdamW(model.parameters(), lr=1e-4)
    else:
        model, opt = ipex_lite.optimize(model, dtype=torch.bfloat16, inplace=True,
                                        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
                                        fuse_update_step=mode.endswith("update-in-backward"))

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (model(x).float() - y).pow(2).mean()
        loss.backward()
        opt.step()
    return run


def _vm_hwm_kb():
    """Peak RSS of this process image (VmHWM; ru_maxrss would carry the parent's peak across fork + exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _peak_memory_mb(mode):
    """Peak RSS growth of three training steps, in a fresh process per mode."""
    import subprocess
    code = ("import sys; sys.path.insert(0, %r); from bench.optimizers import _whole_step_fn, _vm_hwm_kb; "
            "base = _vm_hwm_kb(); fn = _whole_step_fn(%r); [fn() for _ in range(3)]; print(_vm_hwm_kb() - base)"
            % (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), mode))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1]) / 1024


def whole_step(report, args):
    """Whole training step: time interleaved in this process, peak memory each in its own process."""
    res = measure({m: _whole_step_fn(m) for m in WHOLE_STEP_MODES}, repeat=args.repeat, warmup=args.warmup,
                  inner=1)
    report.add("whole step, 25M MLP, AdamW", res, {m: {"peak MB": _peak_memory_mb(m)} for m in WHOLE_STEP_MODES})


if __name__ == "__main__":
    main()
