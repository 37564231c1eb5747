"""Data-parallel training across processes (gloo on 127.0.0.1, started by ipex-lite-run):
identical masters on every rank, the same result as one rank on the whole batch, a dead rank
failing the others with an error instead of a hang, and the guards of wrap_ddp / optimize."""
import datetime
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

import ipex_lite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIAL = os.path.join(ROOT, "tutorials", "dlrm_distributed.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, nproc, timeout=240, env=None):
    cmd = [sys.executable, "-m", "ipex_lite.launcher", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), TUTORIAL, *args]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, **(env or {})))
    return r, time.time() - t0


def run_two_ranks(tmp_path, script_text, *flags):
    """Runs a script as 2 ranks under ipex-lite-run and returns each rank's JSON lines, sorted by
    rank (one log file per rank: their stdout lines would interleave)."""
    script = tmp_path / "ranks.py"
    script.write_text(script_text)
    logs = tmp_path / "logs"
    r = subprocess.run([sys.executable, "-m", "ipex_lite.launcher", *flags, "--nproc-per-node", "2",
                        "--master-port", str(free_port()), "--log-dir", str(logs), str(script)],
                       cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr + "".join(p.read_text() for p in logs.glob("*.log"))
    docs = sorted((json.loads(line) for p in logs.glob("*.log") for line in p.read_text().splitlines()
                   if line.startswith("{")), key=lambda d: d["rank"])
    assert [d["rank"] for d in docs] == [0, 1], docs
    return docs


def test_two_ranks_agree_and_match_one_rank(tmp_path):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    r1, _ = launch(["--steps", "4", "--save", str(one)], 1)
    assert r1.returncode == 0, r1.stderr
    r2, _ = launch(["--steps", "4", "--save", str(two)], 2)
    assert r2.returncode == 0, r2.stderr
    assert "master weights agree on every rank" in r2.stdout
    a, b = torch.load(one), torch.load(two)
    assert a.keys() == b.keys() and all(v.dtype == torch.float32 for v in b.values())
    # same global batches; bf16 compute on half batches vs whole ones rounds differently
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=2e-2, atol=2e-3, msg=k)


def test_fused_tables_exchange_lookups_and_match_one_rank(tmp_path):
    """Tables updated inside backward (plain SGD) stay replicated: every rank applies the update
    of the whole global batch, from the lookups all ranks exchanged."""
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    r1, _ = launch(["--steps", "4", "--fused-tables", "--save", str(one)], 1)
    assert r1.returncode == 0, r1.stderr
    r2, _ = launch(["--steps", "4", "--fused-tables", "--save", str(two)], 2)
    assert r2.returncode == 0, r2.stderr
    assert "tables updated inside backward: 8 of 8" in r2.stdout
    assert "master weights agree on every rank" in r2.stdout
    a, b = torch.load(one), torch.load(two)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=2e-2, atol=2e-3, msg=k)


_LOOKUPS_SCRIPT = """
import json, torch, torch.distributed as dist
from torch import nn
import ipex_lite
from ipex_lite.distributed import gather_lookups, wrap_ddp
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
specs = [ipex_lite.nn.EmbeddingSpec(30, 4, "sum", torch.bfloat16) for _ in range(3)]
# rank-dependent lookups, uneven sizes and per-sample weights: the gathered batch is rank 0's then rank 1's
b = 2 + rank
ix = [torch.arange(t, t + 3 * b) % 30 for t in range(3)]
off = [torch.arange(0, 3 * b + 1, 3) for _ in range(3)]
off[1] = torch.tensor([0] * b + [3 * b - 1])  # include_last_offset: the last index is outside every bag
g = [torch.full((b, 4), float(rank + 1), dtype=torch.bfloat16) for _ in range(3)]
w = [torch.ones(3 * b, dtype=torch.bfloat16) * (rank + 1) for _ in range(3)]
gg, gi, go, gw = gather_lookups(g, ix, off, w, True)
ok = [gi[t].numel() == sum((3 * (2 + r) - (1 if t == 1 else 0)) for r in range(world)) for t in range(3)]
ok.append(all(x.shape == (sum(2 + r for r in range(world)), 4) for x in gg))
ok.append(float(gg[0][0, 0]) == 1.0 / world and float(gg[0][-1, 0]) == world / world)
# an unwrapped fused table under 2 ranks refuses to update from local lookups only
m = ipex_lite.nn.MergedEmbeddingBagWithSGD(specs, lr=0.1)
try:
    sum(o.float().sum() for o in m([i[:6] for i in ix], [torch.tensor([0, 3]) for _ in ix])).backward()
    ok.append(False)
except RuntimeError as e:
    ok.append("wrap_ddp" in str(e))
wrapped = wrap_ddp(m)
for step in range(2):
    out = wrapped([i[:6] for i in ix], [torch.tensor([0, 3]) for _ in ix])
    sum(o.float().sum() for o in out).backward()
digest = torch.stack([m.fp32_weight(t).double().sum() for t in range(3)]).sum().reshape(1)
all_d = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
dist.all_gather(all_d, digest)
ok.append(all(torch.equal(d, all_d[0]) for d in all_d))
print(json.dumps({"rank": rank, "ok": ok}), flush=True)
dist.barrier()
dist.destroy_process_group()
"""


_SPARSE_SCRIPT = """
import copy, gc, json, torch, torch.distributed as dist
from torch import nn
import ipex_lite
from ipex_lite.distributed import wrap_ddp
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
specs = [ipex_lite.nn.EmbeddingSpec(50, 8, "sum", torch.float32, sparse=True) for _ in range(2)]


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.merged = ipex_lite.nn.MergedEmbeddingBag(specs)
        self.stock = nn.EmbeddingBag(40, 8, mode="mean", sparse=True)
        self.lin = nn.Linear(24, 1)

    def forward(self, ix, off, ix2, off2):
        return self.lin(torch.cat(self.merged(ix, off) + [self.stock(ix2, off2)], 1))


ref = Model()
model = copy.deepcopy(ref)
ddp = wrap_ddp(model)
opt = torch.optim.SGD(model.parameters(), lr=0.5)
ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
g = torch.Generator().manual_seed(7)
B, L, per = 8, 3, 8 // world
for step in range(3):
    ix = [torch.randint(0, 50, (B * L,), generator=g) for _ in range(2)]
    ix2 = torch.randint(0, 40, (B * L,), generator=g)
    off = torch.arange(0, B * L, L)
    target = torch.randn(B, 1, generator=g)
    lo, hi = rank * per, (rank + 1) * per
    sl = slice(lo * L, hi * L)
    opt.zero_grad()
    out = ddp([i[sl] for i in ix], [off[:per]] * 2, ix2[sl], off[:per])
    (out - target[lo:hi]).square().mean().backward()
    opt.step()
    ref_opt.zero_grad()
    (ref(ix, [off] * 2, ix2, off) - target).square().mean().backward()
    ref_opt.step()
sparse = [p.grad.is_sparse for p in model.parameters()][:3]
close = all(torch.allclose(a, b, atol=1e-5) for a, b in zip(model.parameters(), ref.parameters()))
d = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
all_d = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
dist.all_gather(all_d, d)
print(json.dumps({"rank": rank, "sparse": sparse, "close": close,
                  "agree": all(torch.equal(x, all_d[0]) for x in all_d)}), flush=True)
dist.barrier()
del ddp  # DDP must go before its process group (else an abort at exit: "terminate called ...")
gc.collect()
dist.destroy_process_group()
"""


def test_replicated_sparse_tables_match_one_process(tmp_path):
    """Sparse-gradient tables under wrap_ddp: MergedEmbeddingBag (kept out of DDP, its touched rows
    all-reduced as sparse tensors) and a stock nn.EmbeddingBag(sparse=True) (DDP's own sparse bucket
    through the comm hook) train like one process on the whole batch."""
    docs = run_two_ranks(tmp_path, _SPARSE_SCRIPT)
    assert all(d["sparse"] == [True, True, True] and d["close"] and d["agree"] for d in docs), docs


def test_gather_lookups_and_unwrapped_fused_tables(tmp_path):
    docs = run_two_ranks(tmp_path, _LOOKUPS_SCRIPT)
    assert all(all(d["ok"]) for d in docs), docs


def test_a_dead_rank_fails_the_others_instead_of_hanging():
    r, seconds = launch(["--steps", "6", "--die-at-step", "2"], 2, env={"DIST_TIMEOUT": "20"})
    assert r.returncode != 0
    assert seconds < 120, seconds
    assert "exiting at step 2 on purpose" in r.stdout
    assert "Error" in r.stderr or "error" in r.stderr


_SHARD_SCRIPT = """
import json, torch, torch.distributed as dist, torch.nn.functional as F
from torch import nn
from ipex_lite.distributed import ShardedEmbeddingBags
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
T, R, D, B = 5, 40, 8, 6  # 5 tables over 2 ranks: 3 and 2
full = [nn.EmbeddingBag(R, D, mode="sum" if t % 2 else "mean") for t in range(T)]
ref = [nn.EmbeddingBag(R, D, mode=f.mode) for f in full]
for a, b in zip(ref, full):
    a.weight.data.copy_(b.weight.data)
g = torch.Generator().manual_seed(1)
lengths = [torch.randint(0, 4, (B,), generator=g) for _ in range(T)]
indices = [torch.randint(0, R, (int(n.sum()),), generator=g) for n in lengths]
offsets = [torch.cat([torch.zeros(1, dtype=torch.long), n.cumsum(0)[:-1]]) for n in lengths]
wts = torch.randn(B, T, D, generator=g)
sharded = ShardedEmbeddingBags(full)
per = B // world
out = sharded(indices, offsets)
lo, hi = rank * per, (rank + 1) * per
want = [F.embedding_bag(indices[t], ref[t].weight, offsets[t], mode=ref[t].mode) for t in range(T)]
fwd = all(torch.allclose(out[t], want[t][lo:hi], atol=1e-6) for t in range(T))
(torch.stack(out, 1) * wts[lo:hi]).sum().backward()   # each rank: the loss of its own samples
(torch.stack(want, 1) * wts).sum().backward()          # reference: the whole batch at once
bwd = all(torch.allclose(tab.weight.grad, ref[t].weight.grad, atol=1e-5)
          for t, tab in zip(sharded.owned, sharded.tables))
print(json.dumps({"rank": rank, "owned": sharded.owned, "fwd": fwd, "bwd": bwd}), flush=True)
dist.barrier()
dist.destroy_process_group()
"""


def test_table_wise_sharding_matches_the_unsharded_model(tmp_path):
    docs = run_two_ranks(tmp_path, _SHARD_SCRIPT)
    assert {tuple(d["owned"]) for d in docs} == {(0, 2, 4), (1, 3)}
    assert all(d["fwd"] and d["bwd"] for d in docs), docs


def test_launcher_sets_rank_variables():
    r = subprocess.run([sys.executable, "-m", "ipex_lite.launcher", "--nproc-per-node", "2", "--nnodes", "3",
                        "--node-rank", "1", "--master-addr", "10.0.0.5", "--master-port", "1234",
                        "--multi-task-manager", "none", "--dry-run", "x.py"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for needle in ("RANK=2 ", "RANK=3 ", "LOCAL_RANK=1", "WORLD_SIZE=6", "MASTER_ADDR=10.0.0.5", "MASTER_PORT=1234"):
        assert needle in r.stdout, needle
    bad = subprocess.run([sys.executable, "-m", "ipex_lite.launcher", "--nproc-per-node", "2", "--node-rank", "2",
                          "--dry-run", "x.py"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--node-rank" in bad.stderr


def _dry(*flags):
    return subprocess.run([sys.executable, "-m", "ipex_lite.launcher", "--multi-task-manager", "none",
                           "--dry-run", *flags, "x.py"], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_hostfile_sets_nodes_master_and_this_node_rank(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text(f"# the job\nnode-a slots=4\n\n{socket.gethostname()}  # this machine\n")
    r = _dry("--hostfile", str(hosts), "--nproc-per-node", "2")
    assert r.returncode == 0, r.stderr
    for needle in ("RANK=2 ", "RANK=3 ", "WORLD_SIZE=4", "MASTER_ADDR=node-a", "GROUP_RANK=1"):
        assert needle in r.stdout, needle
    # an explicit --node-rank wins; --master-addr too
    r = _dry("--hostfile", str(hosts), "--nproc-per-node", "1", "--node-rank", "0", "--master-addr", "10.1.1.1")
    assert "RANK=0 " in r.stdout and "MASTER_ADDR=10.1.1.1" in r.stdout and "WORLD_SIZE=2" in r.stdout
    other = tmp_path / "other"
    other.write_text("node-a\nnode-b\n")
    for flags, message in ((["--hostfile", str(other)], "is not in --hostfile"),
                           (["--hostfile", str(hosts), "--nnodes", "3"], "contradicts"),
                           (["--hostfile", str(tmp_path / "missing")], "No such file"),
                           (["--max-restarts", "2"], "--max-restarts needs --torchrun")):
        bad = _dry(*flags, "--nproc-per-node", "2")
        assert bad.returncode != 0 and message in bad.stderr, (flags, bad.stderr)
    dup = tmp_path / "dup"
    dup.write_text("node-a\nnode-a\n")
    assert "twice" in _dry("--hostfile", str(dup), "--nproc-per-node", "1").stderr


def test_torchrun_dry_run_shows_one_torchrun_and_each_rank():
    r = _dry("--torchrun", "--nproc-per-node", "2", "--nnodes", "2", "--node-rank", "1", "--master-addr", "n0",
             "--max-restarts", "3")
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.splitlines()[1]
    assert "-m torch.distributed.run" in cmd and "--max-restarts 3" in cmd and "--node-rank 1" in cmd
    assert "--master-addr n0" in cmd and "_rank_entry.py <plan>" in cmd
    assert r.stdout.count("cmd: ") == 3 and "RANK=" not in r.stdout  # torchrun sets the rank variables


_PROBE = """
import json, os, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(t)
print(json.dumps({"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": t.item(),
                  "cpus": sorted(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
                  "torchrun": "TORCHELASTIC_RESTART_COUNT" in os.environ,
                  "idx": os.environ.get("IPEX_LITE_INSTANCE_IDX")}), flush=True)
dist.barrier()
dist.destroy_process_group()
"""


def test_torchrun_starts_pinned_ranks(tmp_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 allowed CPUs")
    docs = run_two_ranks(tmp_path, _PROBE, "--torchrun")
    assert all(d["world"] == 2 and d["sum"] == 3.0 for d in docs)
    assert all(d["torchrun"] and d["threads"] == 1 and len(d["cpus"]) == 1 for d in docs), docs
    assert docs[0]["cpus"] != docs[1]["cpus"]  # each local rank on its own core
    assert {d["idx"] for d in docs} == {"0", "1"}


@pytest.fixture
def one_rank_group():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()


def test_wrap_ddp_guards(one_rank_group):
    base = nn.Sequential(nn.EmbeddingBag(50, 8, mode="sum"), nn.Linear(8, 1))
    model, opt = ipex_lite.optimize(base.train(), optimizer=torch.optim.SGD(base.parameters(), lr=0.1),
                                    dtype=torch.bfloat16)
    # optimize() fused the plain-SGD table into backward: wrap_ddp keeps it out of DDP's reducer
    table = model[0]
    assert isinstance(table, ipex_lite.nn.modules.SGDEmbeddingBag)
    ddp_t = ipex_lite.distributed.wrap_ddp(model, opt)
    assert table.replicated and table.process_group is None  # the default group is not held
    assert set(ddp_t.parameters_to_ignore) >= {"0.weight", "0.trail"}
    before = table.weight.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ddp_t(torch.tensor([[1, 2], [3, 4]])).float().sum().backward()
    opt.step()
    assert not torch.equal(table.weight, before)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)).train()
    m2, o2 = ipex_lite.optimize(mlp, optimizer=torch.optim.SGD(mlp.parameters(), lr=0.1), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="gloo"):
        ipex_lite.distributed.wrap_ddp(m2, o2, allreduce_dtype=torch.bfloat16)
    ddp = ipex_lite.distributed.wrap_ddp(m2, o2)
    x = torch.randn(16, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ddp(x).float().sum().backward()
    o2.step()
    assert all(p.grad is not None for p in m2.parameters())
