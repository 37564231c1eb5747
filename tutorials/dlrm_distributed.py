"""Tutorial: data-parallel DLRM training over torch.distributed with split-BF16 fused SGD.

    ipex-lite-run --nproc-per-node 2 tutorials/dlrm_distributed.py      # 2 ranks, gloo, 127.0.0.1
    python tutorials/dlrm_distributed.py                                 # 1 rank (same code path)

Each rank builds the same model (same seed), ``ipex_lite.optimize``s it for bf16 training
(split-BF16 weights, fused SGD), wraps it with ``ipex_lite.distributed.wrap_ddp`` (fp32
all-reduce of the bf16 gradients, optimizer trails broadcast from rank 0) and trains on its
slice of every global batch.  The tables are replicated (data parallel): by default they
share the momentum-SGD group and their dense gradients are all-reduced; with ``--fused-tables``
they get their own plain-SGD group, ``optimize`` updates their touched rows inside backward,
and ``wrap_ddp`` makes the ranks exchange their lookups (bytes proportional to the batch)
instead of all-reducing (rows x dim) gradients.  At the end the ranks compare their fp32 master weights: they must agree bit for
bit.  ``--save PATH`` writes rank 0's fp32 state_dict (the tests compare 1 and 2 ranks);
``--die-at-step K`` makes the last rank exit at step K (the others must fail, not hang).
"""
import argparse
import datetime
import gc
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dlrm import DLRM, make_batch  # noqa: E402

import ipex_lite  # noqa: E402
from ipex_lite.distributed import wrap_ddp  # noqa: E402


def init() -> None:
    if "WORLD_SIZE" not in os.environ:  # run alone: a one-rank group on a free local port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=int(os.environ.get("DIST_TIMEOUT", "60"))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256, help="global batch, split over the ranks")
    parser.add_argument("--tables", type=int, default=8)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--save", default=None)
    parser.add_argument("--die-at-step", type=int, default=None)
    parser.add_argument("--fused-tables", action="store_true",
                        help="plain SGD for the tables: touched-row updates in backward, lookups exchanged")
    args = parser.parse_args(argv)
    init()
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must divide over {world} ranks")

    torch.manual_seed(0)
    model = DLRM(tables=args.tables, rows=args.rows, dim=32, bottom=(64, 32), top=(128, 64)).train()
    tables = list(model.embs.parameters()) if args.fused_tables else []
    rest = [p for p in model.parameters() if all(p is not t for t in tables)]
    groups = [{"params": rest}] + ([{"params": tables, "momentum": 0.0}] if tables else [])
    model, opt = ipex_lite.optimize(model, optimizer=torch.optim.SGD(groups, lr=0.05, momentum=0.9),
                                    dtype=torch.bfloat16)
    ddp = wrap_ddp(model, opt)
    if rank == 0:
        fused = sum(isinstance(m, ipex_lite.nn.modules.SGDEmbeddingBag) for m in model.modules())
        print(f"tables updated inside backward: {fused} of {args.tables}", flush=True)
    loss_fn = nn.BCELoss()
    per = args.batch // world
    times = []
    for step in range(args.steps):
        if args.die_at_step == step and rank == world - 1:
            print(f"rank {rank}: exiting at step {step} on purpose", flush=True)
            os._exit(3)
        dense, indices, offsets, target = make_batch(args.tables, args.rows, args.batch, 1, seed=step)
        lo, hi = rank * per, (rank + 1) * per
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ddp(dense[lo:hi], [i[lo:hi] for i in indices], [o[:per] for o in offsets])
        loss = loss_fn(out.float(), target[lo:hi])
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0:
            print(f"step {step}: loss {mean_loss.item() / world:.5f}  ({times[-1] * 1e3:.1f} ms)", flush=True)

    state = model.state_dict()  # fp32 masters (top and trail joined) under the original keys
    digest = torch.stack([v.double().sum() for v in state.values()]).sum().reshape(1)
    digests = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(digests, digest)
    agree = all(torch.equal(d, digests[0]) for d in digests)
    if rank == 0:
        steady = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
        print(f"{world} rank(s): median step {steady * 1e3:.1f} ms; master weights "
              f"{'agree on every rank' if agree else 'DIFFER between ranks'}")
        if args.save:
            torch.save(state, args.save)
    dist.barrier()  # every rank done with its sockets before any tears the group down
    del ddp  # DDP before its process group: the other order can abort at exit ("terminate called ...")
    gc.collect()
    dist.destroy_process_group()
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
