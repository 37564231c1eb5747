"""DLRM end to end: stock eager vs torch.compile vs ipex_lite.

    python bench/dlrm.py [--rows 100000 --batch 2048 --pooling 1] [--no-compile] [--no-train] [--json]

Model (tutorials/dlrm.py): 13 dense features, 26 tables x rows x 128, bottom
MLP 512-256-128, top MLP 1024-1024-512-256-1.  Inference in fp32 (and bf16
autocast for ipex_lite); one training step with SGD: stock (dense table
gradients) vs ipex_lite (fused-SGD merged tables, torch.optim.SGD for MLPs).
"""
import argparse
import copy
import os
import sys

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tutorials"))
from bench.harness import Report, add_common_args, measure, setup_from_args  # noqa: E402
from dlrm import DLRM, make_batch, to_ipex_lite  # noqa: E402

import ipex_lite  # noqa: E402


def main(argv=None):
    parser = add_common_args(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--tables", type=int, default=26)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--pooling", type=int, default=1)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--no-train", dest="train", action="store_false")
    args = parser.parse_args(argv)
    setup_from_args(args)
    torch.manual_seed(0)
    report = Report(f"DLRM {args.tables} tables x {args.rows} x 128, B={args.batch}, {args.pooling} index/bag",
                    reference="stock")
    stock = DLRM(tables=args.tables, rows=args.rows, dim=128).eval()
    lite = to_ipex_lite(stock).eval()
    dense, indices, offsets, target = make_batch(args.tables, args.rows, args.batch, args.pooling)

    systems = {"stock": lambda: stock(dense, indices, offsets)}
    if args.compile:
        import torch._inductor.config as inductor_config
        inductor_config.freezing = True
        compiled = torch.compile(stock)
        systems["torch.compile"] = lambda: compiled(dense, indices, offsets)
    # what a user runs: merged tables + fused interaction, then optimize() for prepacked, ReLU-fused MLPs
    lite_opt = ipex_lite.optimize(lite)
    systems["ipex_lite"] = lambda: lite_opt(dense, indices, offsets)
    with torch.no_grad():  # IPEX's inference recipe: trace + freeze (the graph runs the packed and fused ops)
        lite_jit = torch.jit.freeze(torch.jit.trace(lite_opt, (dense, indices, offsets)))
        lite_jit(dense, indices, offsets)
    systems["ipex_lite jit"] = lambda: lite_jit(dense, indices, offsets)

    def lite_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lite(dense, indices, offsets)
    systems["ipex_lite bf16 autocast"] = lite_bf16

    with torch.no_grad():
        want = stock(dense, indices, offsets)
        got = lite_opt(dense, indices, offsets)
        diff = (got - want).abs().max().item()
        res = measure(systems, repeat=args.repeat, warmup=args.warmup)
    report.add("inference fp32", res)
    notes = [f"ipex_lite fp32 output vs stock: max |diff| {diff:.2e}",
             "inference ipex_lite: ipex_lite.optimize(to_ipex_lite(model)), i.e. MergedEmbeddingBag, fused "
             "interaction, prepacked Linear+ReLU/Sigmoid; bf16 autocast row: to_ipex_lite(model) under autocast"]

    if args.train:
        train_stock = copy.deepcopy(stock).train()
        train_lite = to_ipex_lite(copy.deepcopy(stock).train(), train_lr=0.01)
        opt_stock = torch.optim.SGD(train_stock.parameters(), lr=0.01)
        opt_lite = torch.optim.SGD(list(train_lite.bottom.parameters()) + list(train_lite.top.parameters()),
                                   lr=0.01)
        loss_fn = nn.BCELoss()

        def step(model, opt):
            def run():
                opt.zero_grad(set_to_none=True)
                loss_fn(model(dense, indices, offsets), target).backward()
                opt.step()
            return run

        # the plain model, optimize()d for bf16: split-BF16 MLPs, plain-SGD tables updated in backward
        plain = copy.deepcopy(stock).train()
        opt_plain = torch.optim.SGD(plain.parameters(), lr=0.01)
        opt_model, opt_bf16 = ipex_lite.optimize(plain, dtype=torch.bfloat16, optimizer=opt_plain, inplace=True)

        def step_bf16():
            opt_bf16.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = opt_model(dense, indices, offsets)
            loss_fn(out.float(), target).backward()
            opt_bf16.step()

        res = measure({"stock": step(train_stock, opt_stock), "ipex_lite": step(train_lite, opt_lite),
                       "ipex_lite optimize(bf16)": step_bf16},
                      repeat=max(3, args.repeat // 3), warmup=1)
        report.add("train step SGD (stock fp32)", res)
        notes.append("train: stock builds dense gradients for all 26 tables; ipex_lite updates only touched rows "
                     "inside backward (MergedEmbeddingBagWithSGD, fp32); optimize(bf16) is the unchanged model "
                     "after ipex_lite.optimize(model, optimizer, dtype=torch.bfloat16) under bf16 autocast")
    report.emit(args.json, notes)
    if diff > 1e-3:
        print(f"ipex_lite output differs from stock by {diff:.2e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
