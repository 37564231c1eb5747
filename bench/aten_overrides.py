"""Opt-in ATen overrides: the same stock model code with ipex_lite's kernels
on and off, toggled per call in one process (interleaved).

    python bench/aten_overrides.py [--quick] [--json]

Each case is one forward + backward of a stock nn.EmbeddingBag (autograd
reaches aten::_embedding_bag_backward for the weight gradient); gradients are
dropped after each step.  Run under `ipex-lite-run` (jemalloc) to see the kernels rather than
glibc page-faulting a fresh dense gradient: a 100k x 128 fp32 gradient is
51 MB, above glibc's largest mmap threshold, so without a caching allocator
every step faults it in again and both sides spend most of their time there.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import Report, add_common_args, measure, setup_from_args  # noqa: E402

import ipex_lite  # noqa: E402


def toggled(op, step):
    """Two callables running `step` with the override off (stock) and on."""
    def stock():
        ipex_lite.disable_aten_overrides([op])
        step()

    def ours():
        ipex_lite.enable_aten_overrides([op])
        step()
    return {"stock": stock, "ipex_lite": ours}


def grad_after(op, on, step, param):
    (ipex_lite.enable_aten_overrides if on else ipex_lite.disable_aten_overrides)([op])
    param.grad = None
    step()
    return param.grad.float().clone()


def main(argv=None):
    parser = add_common_args(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--rows", type=int, default=100_000, help="embedding bag table rows")
    args = parser.parse_args(argv)
    setup_from_args(args)
    torch.manual_seed(0)
    report = Report("opt-in ATen overrides", reference="stock")
    notes = []
    batch, dim = 2048, 128
    for dtype in (torch.float32, torch.bfloat16):
        for mode, per_bag in (("sum", 1), ("sum", 20), ("mean", 20)):
            bag = torch.nn.EmbeddingBag(args.rows, dim, mode=mode).to(dtype)
            idx = torch.randint(0, args.rows, (batch * per_bag,))
            off = torch.arange(0, batch * per_bag, per_bag)
            g = torch.randn(batch, dim, dtype=dtype)

            def step(bag=bag, idx=idx, off=off, g=g):
                bag.weight.grad = None
                bag(idx, off).backward(g)
            name = f"EmbeddingBag {args.rows}x{dim} {mode} {str(dtype)[6:]} B={batch} {per_bag}/bag"
            op = "_embedding_bag_backward"
            diff = (grad_after(op, True, step, bag.weight) - grad_after(op, False, step, bag.weight)).abs().max()
            notes.append(f"{name}: max |grad diff| vs stock {diff.item():.1e}")
            report.add(name, measure(toggled(op, step), repeat=args.repeat, warmup=args.warmup))
    ipex_lite.disable_aten_overrides()
    notes.append("allocator: " + (os.environ.get("LD_PRELOAD") or "default (glibc)"))
    report.emit(args.json, notes)


if __name__ == "__main__":
    main()
