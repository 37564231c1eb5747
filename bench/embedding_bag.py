"""Merged embedding bags vs the stock per-table nn.EmbeddingBag loop.

    python bench/embedding_bag.py [--tables 26 --rows 100000 --dim 128 --batch 2048] [--cold] [--json]

Forward (sum pooling) with 1 and 20 indices per bag, fp32 and bf16, and one
training step: ipex_lite's fused-SGD tables vs per-table sparse=True
EmbeddingBag + torch.optim.SGD.  GB/s counts the embedding rows gathered.
Every sample looks up the same rows, so by default they come from L3 when
they fit (1 index per bag: 27 MB); --cold evicts the caches before each
forward sample, as when every batch brings new rows.
"""
import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import Report, add_common_args, import_ipex, measure, setup_from_args  # noqa: E402

from ipex_lite.nn import MergedEmbeddingBag, MergedEmbeddingBagWithSGD  # noqa: E402


def make_inputs(tables, rows, batch, pooling, seed=0):
    g = torch.Generator().manual_seed(seed)
    indices = [torch.randint(0, rows, (batch * pooling,), generator=g) for _ in range(tables)]
    offsets = [torch.arange(0, batch * pooling, pooling) for _ in range(tables)]
    return indices, offsets


def _no_grad(module, indices, offsets):
    with torch.no_grad():
        return module(indices, offsets)


def main(argv=None):
    parser = add_common_args(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--tables", type=int, default=26)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--poolings", default="1,20")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--no-train", dest="train", action="store_false")
    parser.add_argument("--cold", action="store_true",
                        help="evict the caches (write 300 MB) before every forward sample, as when each batch "
                             "looks up new rows")
    args = parser.parse_args(argv)
    setup_from_args(args)
    torch.manual_seed(0)
    report = Report(f"embedding bags: {args.tables} tables x {args.rows} x {args.dim}, B={args.batch}"
                    + (", caches evicted before each sample" if args.cold else ""),
                    reference="stock")
    ipex = import_ipex()
    junk = torch.empty(300 << 18) if args.cold else None  # 300 MB of fp32
    flush = (lambda: junk.fill_(1.0)) if args.cold else None
    for dt_name in args.dtypes.split(","):
        dtype = getattr(torch, dt_name)
        stock = [nn.EmbeddingBag(args.rows, args.dim, mode="sum").to(dtype) for _ in range(args.tables)]
        merged = MergedEmbeddingBag.from_embeddingbag_list(stock)
        ipex_merged = ipex.nn.modules.MergedEmbeddingBag.from_embeddingbag_list(stock) if ipex else None
        for pooling in (int(p) for p in args.poolings.split(",")):
            indices, offsets = make_inputs(args.tables, args.rows, args.batch, pooling)

            def run_stock():
                with torch.no_grad():
                    return [t(i, o) for t, i, o in zip(stock, indices, offsets)]

            fns = {"stock": run_stock, "ipex_lite": lambda: _no_grad(merged, indices, offsets)}
            if ipex_merged is not None:
                fns["ipex"] = lambda: _no_grad(ipex_merged, indices, offsets)
            res = measure(fns, repeat=args.repeat, warmup=args.warmup, before=flush)
            nbytes = args.tables * args.batch * pooling * args.dim * torch.finfo(dtype).bits // 8
            extra = {s: {"GB/s": nbytes / (r["median_ms"] * 1e-3) / 1e9} for s, r in res.items()}
            report.add(f"forward {dt_name} {pooling}/bag", res, extra)
        if args.train and dtype == torch.float32:
            sparse = [nn.EmbeddingBag(args.rows, args.dim, mode="sum", sparse=True) for _ in range(args.tables)]
            fused = MergedEmbeddingBagWithSGD.from_embeddingbag_list(sparse, lr=0.01)
            ipex_fused = ipex.nn.modules.MergedEmbeddingBagWithSGD.from_embeddingbag_list(sparse, lr=0.01) \
                if ipex else None
            opt = torch.optim.SGD([t.weight for t in sparse], lr=0.01)
            for pooling in (int(p) for p in args.poolings.split(",")):
                indices, offsets = make_inputs(args.tables, args.rows, args.batch, pooling, seed=1)
                grads = [torch.randn(args.batch, args.dim) for _ in range(args.tables)]

                def step_stock():
                    outs = [t(i, o) for t, i, o in zip(sparse, indices, offsets)]
                    torch.autograd.backward(outs, grads)
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                def step_lite():
                    torch.autograd.backward(fused(indices, offsets), grads)

                fns = {"stock": step_stock, "ipex_lite": step_lite}
                if ipex_fused is not None:
                    fns["ipex"] = lambda: torch.autograd.backward(ipex_fused(indices, offsets), grads)
                res = measure(fns, repeat=args.repeat, warmup=args.warmup)
                report.add(f"train step SGD fp32 {pooling}/bag", res)
            del sparse, fused, ipex_fused, opt
    report.emit(args.json, ["stock = per-table nn.EmbeddingBag loop; train: sparse=True + torch.optim.SGD",
                            "ipex = IPEX's MergedEmbeddingBag / MergedEmbeddingBagWithSGD when IPEX imports "
                            + ("(present)" if ipex else "(absent: it needs torch 2.8)"),
                            "GB/s = embedding rows gathered / median time"])


if __name__ == "__main__":
    main()
