"""Tutorial: a toy DLRM with ipex_lite's dot interaction.

    python tutorials/dlrm_interaction.py

DLRM (deep learning recommendation model) combines
  * a bottom MLP over dense features (13 in the Criteo data set),
  * one embedding bag per categorical feature,
  * the *dot interaction*: pairwise dot products between the bottom-MLP output
    and all embedding vectors (``ipex_lite.nn.functional.interaction``),
  * a top MLP that maps the interaction to a click probability.

The script trains a few SGD steps on random data, runs inference under
``torch.autocast("cpu", dtype=torch.bfloat16)``, and checks the interaction
against the stock bmm + tril formulation.  It exits non-zero when a check fails.
"""
import sys

import torch
import torch.nn as nn

import ipex_lite as ipex

DENSE_FEATURES = 13
EMBEDDING_DIM = 16
TABLE_SIZES = [100, 50, 200, 30]      # rows of each categorical table
BAG_SIZE = 3                          # ids per sample and table
BATCH = 64


class ToyDLRM(nn.Module):
    def __init__(self):
        super().__init__()
        self.bottom = nn.Sequential(
            nn.Linear(DENSE_FEATURES, 32), nn.ReLU(),
            nn.Linear(32, EMBEDDING_DIM), nn.ReLU(),
        )
        self.tables = nn.ModuleList(nn.EmbeddingBag(rows, EMBEDDING_DIM, mode="sum")
                                    for rows in TABLE_SIZES)
        n = 1 + len(TABLE_SIZES)                       # dense vector + one per table
        interaction_width = EMBEDDING_DIM + n * (n - 1) // 2
        self.top = nn.Sequential(
            nn.Linear(interaction_width, 32), nn.ReLU(),
            nn.Linear(32, 1),
        )

    def features(self, dense, sparse):
        """The N (B, D) tensors that go into the interaction."""
        x = self.bottom(dense)
        embs = [table(ids, offsets) for table, (ids, offsets) in zip(self.tables, sparse)]
        return [x] + embs

    def forward(self, dense, sparse):
        z = ipex.nn.functional.interaction(*self.features(dense, sparse))
        return self.top(z)


def reference_interaction(xs):
    """Stock DLRM formulation: bmm of the stacked features, strict lower triangle."""
    batch, dim = xs[0].shape
    n = len(xs)
    t = torch.stack(xs, dim=1)                           # (B, N, D)
    z = torch.bmm(t, t.transpose(1, 2))                  # (B, N, N)
    li, lj = torch.tril_indices(n, n, offset=-1)
    return torch.cat([xs[0], z[:, li, lj]], dim=1)


def random_batch(gen):
    dense = torch.randn(BATCH, DENSE_FEATURES, generator=gen)
    sparse = []
    for rows in TABLE_SIZES:
        ids = torch.randint(0, rows, (BATCH * BAG_SIZE,), generator=gen)
        offsets = torch.arange(0, BATCH * BAG_SIZE, BAG_SIZE)
        sparse.append((ids, offsets))
    labels = torch.randint(0, 2, (BATCH, 1), generator=gen).float()
    return dense, sparse, labels


def main():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    print(f"ipex_lite {ipex.__version__}, torch {torch.__version__}, "
          f"kernels at ISA level {ipex.cpu_capability()}")

    model = ToyDLRM()
    failures = []

    # 1. The interaction matches the stock formulation (forward and backward).
    dense, sparse, labels = random_batch(gen)
    with torch.no_grad():
        feats = [f.detach() for f in model.features(dense, sparse)]
    a = [f.clone().requires_grad_() for f in feats]
    b = [f.clone().requires_grad_() for f in feats]
    out = ipex.nn.functional.interaction(*a)
    ref = reference_interaction(b)
    n = len(feats)
    expected_shape = (BATCH, EMBEDDING_DIM + n * (n - 1) // 2)
    if tuple(out.shape) != expected_shape:
        failures.append(f"interaction shape {tuple(out.shape)} != {expected_shape}")
    elif not torch.allclose(out, ref, rtol=1e-5, atol=1e-5):
        failures.append(f"interaction forward differs from bmm+tril: max abs diff "
                        f"{(out - ref).abs().max().item():.3g}")
    else:
        grad = torch.randn_like(out)
        out.backward(grad)
        ref.backward(grad)
        for i, (ga, gb) in enumerate(zip(a, b)):
            if not torch.allclose(ga.grad, gb.grad, rtol=1e-4, atol=1e-4):
                failures.append(f"interaction gradient of input {i} differs from bmm+tril")
    print("interaction vs bmm+tril reference:", "ok" if not failures else "MISMATCH")

    # 2. A few SGD training steps in fp32.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.BCEWithLogitsLoss()
    dense, sparse, labels = random_batch(gen)          # overfit one batch: loss should fall
    losses = []
    for step in range(10):
        opt.zero_grad()
        loss = loss_fn(model(dense, sparse), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        print(f"step {step}: loss {loss.item():.4f}")
    if not all(torch.isfinite(torch.tensor(losses))):
        failures.append("training produced a non-finite loss")
    elif losses[-1] >= losses[0]:
        failures.append(f"loss did not decrease ({losses[0]:.4f} -> {losses[-1]:.4f})")

    # 3. Inference under bf16 autocast: the interaction runs in bf16.
    model.eval()
    with torch.no_grad():
        fp32_logits = model(dense, sparse)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_logits = model(dense, sparse)
            z = ipex.nn.functional.interaction(*model.features(dense, sparse))
    print(f"autocast inference: logits dtype {bf16_logits.dtype}, interaction dtype {z.dtype}, "
          f"bf16 loss {loss_fn(bf16_logits.float(), labels).item():.4f}")
    diff = (bf16_logits.float() - fp32_logits).abs().max().item()
    print(f"max |bf16 - fp32| logit difference: {diff:.4f}")
    if not torch.isfinite(bf16_logits.float()).all():
        failures.append("bf16 inference produced non-finite logits")
    elif diff > 0.25:
        failures.append(f"bf16 logits differ from fp32 by {diff:.3g}")

    if failures:
        for f in failures:
            print("FAILED:", f, file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
