"""ipex_lite.cpu.runtime: CPU pools, pinning read back from the OS, tasks,
multi-stream inference equal to the plain model (uneven splits, tiny
batches, nested inputs/outputs, optimized and int8 models, concurrent
callers), errors surfacing in the caller."""
import json
import os
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

import ipex_lite
from ipex_lite import _C
from ipex_lite.cpu.runtime import (CPUPool, MultiStreamModule, MultiStreamModuleHint, Task, TaskFuture,
                                   get_core_list_of_node_id, pin)

CORES = CPUPool().core_ids
needs_two = pytest.mark.skipif(len(CORES) < 2, reason="needs 2 usable physical cores")


def test_pools():
    assert CORES and set(CORES) <= set(_C.current_thread_affinity())
    assert CPUPool(node_id=0).core_ids == get_core_list_of_node_id(0)
    with pytest.raises(ValueError, match="not available"):
        CPUPool(core_ids=[100000])
    with pytest.raises(ValueError, match="NUMA node"):
        get_core_list_of_node_id(999)
    with pytest.raises(ValueError, match="not both"):
        CPUPool(core_ids=[CORES[0]], node_id=0)
    parts = CPUPool().split(len(CORES))
    assert [p.core_ids for p in parts] == [[c] for c in CORES]
    with pytest.raises(ValueError):
        CPUPool().split(len(CORES) + 1)


def test_pin_binds_the_thread_and_its_openmp_team_then_restores():
    before_cpus, before_threads = _C.current_thread_affinity(), torch.get_num_threads()
    pool = CPUPool(core_ids=[CORES[0]])
    with pin(pool):
        assert _C.current_thread_affinity() == [CORES[0]]
        assert torch.get_num_threads() == 1
        assert all(cpus == [CORES[0]] for cpus in _C.team_affinities())
    assert _C.current_thread_affinity() == before_cpus and torch.get_num_threads() == before_threads


def test_task_runs_pinned_and_surfaces_errors():
    pool = CPUPool(core_ids=[CORES[-1]])
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))  # a process-wide count set earlier must not leak into the stream
    torch.set_num_threads(before)
    task = Task(lambda: (_C.current_thread_affinity(), _C.team_affinities(), torch.get_num_threads()), pool)
    cpus, team, threads = task.run_sync()
    assert cpus == [CORES[-1]] and threads == 1 and all(t == [CORES[-1]] for t in team)
    lin = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    t2 = Task(lin, pool)
    assert torch.equal(t2.run_async(x).result(), lin(x))
    future = t2(x)  # IPEX: calling a task is asynchronous, the future has get()
    assert isinstance(future, TaskFuture) and torch.equal(future.get(), lin(x))

    def boom(v):
        raise KeyError(v)
    with pytest.raises(KeyError, match="bad"):
        Task(boom, pool).run_sync("bad")
    with pytest.raises(TypeError):
        Task(42, pool)


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 4), nn.Linear(6, 2)

    def forward(self, pair, extra):
        x, y = pair
        h = self.a(x) + extra["bias"]
        return {"h": h, "both": (self.b(y), h.sum(1, keepdim=True))}


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 5)).eval()


@needs_two
@pytest.mark.parametrize("batch", [5, 2, 1])
def test_multistream_equals_plain_model(batch):
    model = _cnn()
    x = torch.randn(batch, 3, 12, 12)
    ms = MultiStreamModule(model, num_streams=2)
    with torch.no_grad():
        want = torch.cat([model(c) for c in torch.tensor_split(x, 2)]) if batch >= 2 else model(x)
        got = ms(x)
        torch.testing.assert_close(got, model(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(got, want)


@needs_two
def test_multistream_nested_inputs_outputs_and_hints():
    torch.manual_seed(0)
    model = Nested().eval()
    x, y = torch.randn(7, 6), torch.randn(7, 6)
    extra = {"bias": torch.randn(4)}
    hint = MultiStreamModuleHint((0, 0), {"bias": None})
    ms = MultiStreamModule(model, num_streams=2, input_split_hint=hint,
                           output_concat_hint={"h": 0, "both": (0, 0)})
    with torch.no_grad():
        got, want = ms((x, y), extra), model((x, y), extra)
    torch.testing.assert_close(got["h"], want["h"])
    torch.testing.assert_close(got["both"][0], want["both"][0])
    torch.testing.assert_close(got["both"][1], want["both"][1])
    raw = MultiStreamModule(model, num_streams=2, input_split_hint=hint, concat_output=False)
    with torch.no_grad():
        assert len(raw((x, y), extra)) == 2


@needs_two
def test_multistream_optimized_int8_traced_and_concurrent_callers():
    model = _cnn()
    x = torch.randn(6, 3, 12, 12)
    opt = ipex_lite.optimize(model)
    prepared = ipex_lite.quantization.prepare(model, example_inputs=x)
    with torch.no_grad():
        prepared(x)
    int8 = ipex_lite.quantization.convert(prepared)
    with torch.no_grad():  # IPEX's recipe: a traced, frozen model; it runs its packed ops without the GIL
        frozen = torch.jit.freeze(torch.jit.trace(opt, x[:3]))
    for m in (opt, int8, frozen):
        ms = MultiStreamModule(m, num_streams=2)
        with torch.no_grad():
            want = torch.cat([m(c) for c in torch.tensor_split(x, 2)])
            results = [None] * 4

            def call(i):
                with torch.no_grad():
                    results[i] = ms(x)
            threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert all(torch.equal(r, want) for r in results)


@needs_two
def test_stream_failure_surfaces_in_caller():
    ms = MultiStreamModule(nn.Linear(4, 2), num_streams=2)
    with pytest.raises(RuntimeError):
        ms(torch.randn(4, 5))  # wrong feature size inside both streams


def test_auto_and_bad_arguments():
    model = nn.Linear(3, 3)
    assert MultiStreamModule(model).num_streams == (1 if len(CORES) < 8 else len(CORES) // 4)
    with pytest.raises(ValueError, match="num_streams"):
        MultiStreamModule(model, num_streams=0)
    with pytest.raises(ValueError, match="cores"):
        MultiStreamModule(model, num_streams=len(CORES) + 1)
    with pytest.raises(ValueError, match="empty"):
        _C.bind_current_thread([])
    with pytest.raises(ValueError, match="out of range"):
        _C.bind_current_thread([-1])
    with pytest.raises(ValueError, match="bind_team: empty CPU list"):
        _C.bind_team([[]])
    with pytest.raises(ValueError, match="bind_team: CPU id -1 out of range"):
        _C.bind_team([[-1]])
    with pytest.raises(ValueError, match="no team threads"):
        _C.bind_team([])


_PROC_BIND_SCRIPT = """
import json, os, torch, ipex_lite
from ipex_lite import _C
from ipex_lite.cpu.runtime import CPUPool, Task, pin
torch.ones(64, 64).sum()
cores = CPUPool().core_ids
last = Task(lambda: _C.team_affinities(), CPUPool([cores[-1]])).run_sync()
both = Task(lambda: _C.team_affinities(), CPUPool(cores[:2])).run_sync()
before = _C.team_affinities()
with pin(CPUPool([cores[-1]])):
    inside = _C.team_affinities()
print(json.dumps({"thread": sorted(os.sched_getaffinity(0)), "process": _C.process_cpus(), "cores": cores,
                  "last": last, "both": both, "inside": inside, "restored": _C.team_affinities() == before}))
"""


@needs_two
def test_streams_bind_their_openmp_teams_under_omp_proc_bind():
    """ipex-lite-run sets OMP_PROC_BIND: the OpenMP runtime then narrows the main thread to its
    first place and would bind a stream's team by its places, not by the stream's cores."""
    env = dict(os.environ, OMP_PROC_BIND="CLOSE", OMP_NUM_THREADS=str(len(CORES)))
    r = subprocess.run([sys.executable, "-c", _PROC_BIND_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(got["thread"]) == 1  # what os.sched_getaffinity sees on the main thread
    assert got["process"] == sorted(CORES) and got["cores"] == CORES
    assert got["last"] == [[CORES[-1]]]
    assert got["both"] == [[CORES[0]], [CORES[1]]]
    assert got["inside"] == [[CORES[-1]]] and got["restored"]
