"""Tutorial: DLRM on ipex_lite -- merged embedding bags, fused interaction,
fused-SGD embedding training.

    python tutorials/dlrm.py                      # small sizes, a few seconds
    python tutorials/dlrm.py --rows 100000 --batch 2048 --steps 3   # the benchmark's sizes

A DLRM (deep learning recommendation model) has 13 dense features going
through a bottom MLP, 26 categorical features looked up in embedding tables,
the dot interaction of all 27 vectors, and a top MLP.  This script

1. builds the stock model (per-table nn.EmbeddingBag, bmm + tril interaction),
2. converts it with ``to_ipex_lite`` (MergedEmbeddingBag + ipex_lite's
   interaction; the MLPs are shared), passes that to ``ipex_lite.optimize``
   (prepacked Linear layers with their ReLU / Sigmoid fused) and checks the
   outputs agree,
3. runs fp32 and bf16-autocast inference,
4. trains a few steps: the tables with MergedEmbeddingBagWithSGD (the update
   happens inside backward, one pass per distinct row, no dense gradient of
   the tables is ever built) and the MLPs with torch.optim.SGD, and checks the
   result matches the same steps done the stock way.

It exits non-zero when a check fails.
"""
import argparse
import copy
import sys
import time

import torch
from torch import nn

import ipex_lite
from ipex_lite.nn import MergedEmbeddingBag, MergedEmbeddingBagWithSGD


def mlp(sizes, sigmoid_last=False):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        layers.append(nn.Sigmoid() if (sigmoid_last and i == len(sizes) - 2) else nn.ReLU())
    return nn.Sequential(*layers)


def stock_interaction(x, ly):
    batch, dim = x.shape
    t = torch.cat([x] + ly, dim=1).view(batch, -1, dim)
    z = torch.bmm(t, t.transpose(1, 2))
    n = t.shape[1]
    li, lj = torch.tril_indices(n, n, offset=-1)
    return torch.cat([x, z[:, li, lj]], dim=1)


class DLRM(nn.Module):
    """The stock model, as DLRM's reference implementation writes it."""

    def __init__(self, dense_in=13, tables=26, rows=1000, dim=128, bottom=(512, 256), top=(1024, 1024, 512, 256)):
        super().__init__()
        self.bottom = mlp([dense_in, *bottom, dim])
        self.embs = nn.ModuleList(nn.EmbeddingBag(rows, dim, mode="sum") for _ in range(tables))
        n = tables + 1
        self.top = mlp([dim + n * (n - 1) // 2, *top, 1], sigmoid_last=True)

    def forward(self, dense, indices, offsets):
        x = self.bottom(dense)
        ly = [e(i, o) for e, i, o in zip(self.embs, indices, offsets)]
        return self.top(stock_interaction(x, ly))


class DLRMLite(nn.Module):
    """Same parameters; merged tables and the fused interaction."""

    def __init__(self, stock: DLRM, train_lr=None):
        super().__init__()
        self.bottom = stock.bottom
        self.top = stock.top
        if train_lr is None:
            self.embs = MergedEmbeddingBag.from_embeddingbag_list(list(stock.embs))
        else:
            self.embs = MergedEmbeddingBagWithSGD.from_embeddingbag_list(list(stock.embs), lr=train_lr)

    def forward(self, dense, indices, offsets):
        x = self.bottom(dense)
        ly = self.embs(indices, offsets)
        return self.top(ipex_lite.nn.functional.interaction(x, *ly))


def to_ipex_lite(stock: DLRM, train_lr=None) -> DLRMLite:
    return DLRMLite(stock, train_lr)


def make_batch(tables, rows, batch, pooling, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(batch, 13, generator=g)
    indices = [torch.randint(0, rows, (batch * pooling,), generator=g) for _ in range(tables)]
    offsets = [torch.arange(0, batch * pooling, pooling) for _ in range(tables)]
    target = torch.randint(0, 2, (batch, 1), generator=g).float()
    return dense, indices, offsets, target


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", type=int, default=26)
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--pooling", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.01)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    ok = True

    stock = DLRM(tables=args.tables, rows=args.rows, dim=args.dim, bottom=(128, 64), top=(256, 128)).eval()
    lite = ipex_lite.optimize(to_ipex_lite(stock).eval())
    dense, indices, offsets, target = make_batch(args.tables, args.rows, args.batch, args.pooling)

    with torch.no_grad():
        stock(dense, indices, offsets), lite(dense, indices, offsets)  # first calls create oneDNN primitives
        t0 = time.perf_counter()
        want = stock(dense, indices, offsets)
        t1 = time.perf_counter()
        got = lite(dense, indices, offsets)
        t2 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_bf16 = lite(dense, indices, offsets)
    err = (got - want).abs().max().item()
    err_bf16 = (got_bf16.float() - want).abs().max().item()
    print(f"fp32 inference: stock {1e3 * (t1 - t0):.1f} ms, ipex_lite {1e3 * (t2 - t1):.1f} ms, max |diff| {err:.2e}")
    print(f"bf16 autocast inference: max |diff| vs fp32 {err_bf16:.2e}")
    ok &= err < 1e-4 and err_bf16 < 5e-2

    # Training: stock (dense table gradients + SGD) vs fused-SGD tables.
    train_stock = copy.deepcopy(stock).train()
    train_lite = to_ipex_lite(copy.deepcopy(stock).train(), train_lr=args.lr)
    opt_stock = torch.optim.SGD(train_stock.parameters(), lr=args.lr)
    mlp_params = list(train_lite.bottom.parameters()) + list(train_lite.top.parameters())
    opt_lite = torch.optim.SGD(mlp_params, lr=args.lr)
    loss_fn = nn.BCELoss()
    fp32_losses = []
    for step in range(args.steps):
        dense, indices, offsets, target = make_batch(args.tables, args.rows, args.batch, args.pooling, seed=step + 1)
        for model, opt in ((train_stock, opt_stock), (train_lite, opt_lite)):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(dense, indices, offsets), target)
            loss.backward()  # for train_lite this also updates the tables
            opt.step()
            if model is train_stock:
                loss_stock = loss.item()
            else:
                loss_lite = loss.item()
        print(f"step {step}: loss stock {loss_stock:.5f}  ipex_lite {loss_lite:.5f}")
        fp32_losses.append(loss_stock)
        ok &= abs(loss_stock - loss_lite) < 1e-4
    table_err = max((a.detach() - b.weight.detach()).abs().max().item()
                    for a, b in zip(train_lite.embs.weights, train_stock.embs))
    print(f"tables after {args.steps} steps: max |diff| {table_err:.2e}")
    ok &= table_err < 1e-4

    # bf16 training: bf16 tables holding an fp32 master as top + trail
    # (split-BF16, 4 bytes per parameter), MLPs under bf16 autocast.
    bf16 = DLRMLite(copy.deepcopy(stock).train(), train_lr=None)
    bf16.embs = MergedEmbeddingBagWithSGD.from_embeddingbag_list(list(stock.embs), dtype=torch.bfloat16,
                                                                  lr=args.lr)
    opt_bf16 = torch.optim.SGD(list(bf16.bottom.parameters()) + list(bf16.top.parameters()), lr=args.lr)
    losses = []
    for step in range(args.steps):
        dense, indices, offsets, target = make_batch(args.tables, args.rows, args.batch, args.pooling, seed=step + 1)
        opt_bf16.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = bf16(dense, indices, offsets)
        loss = loss_fn(out.float(), target)
        loss.backward()
        opt_bf16.step()
        losses.append(loss.item())
    drift = max((bf16.embs.fp32_weight(t) - train_stock.embs[t].weight.detach()).abs().max().item()
                for t in range(args.tables))
    print(f"bf16 split training losses {[round(v, 4) for v in losses]}; tables vs fp32 training: max |diff| "
          f"{drift:.2e}")
    ok &= all(abs(a - b) < 5e-2 for a, b in zip(losses, fp32_losses)) and drift < 5e-2
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
