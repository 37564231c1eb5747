"""Multi-stream inference inside one process (IPEX's runtime extension names)::

    from ipex_lite.cpu.runtime import CPUPool, MultiStreamModule, Task, pin
    model = MultiStreamModule(model, num_streams=2)       # batch split over 2 pinned streams
    y = model(x)                                         # same result as the plain model on x

A stream is a dedicated worker thread bound (``sched_setaffinity``) to its
own cores, whose OpenMP team size is its core count: both are per-thread
settings made in C++ on that thread (``ipex_lite._C``), so the process's
``torch.get_num_threads()`` and every other thread are untouched.  OpenMP
teams a stream starts inherit its CPU mask.  torch ops release the GIL while
they compute, so streams overlap; the Python glue between ops is serialised.
An exception in a stream is raised in the caller.

Note: MKL keeps the process-wide thread count inside a stream (torch exposes
no per-thread MKL setting); ipex_lite's packed and int8 layers run on oneDNN,
which follows the stream's team size.
"""
import concurrent.futures
import contextlib
import queue
import threading
from typing import Any, Callable, List, Optional, Sequence, Union

import torch
from torch import nn

from ... import _C

__all__ = ["CPUPool", "pin", "Task", "TaskFuture", "MultiStreamModule", "MultiStreamModuleHint",
           "get_core_list_of_node_id", "is_runtime_ext_enabled"]


def _cpu_info():
    from ...launcher.cpu_info import CPUInfo
    # not os.sched_getaffinity: under OMP_PROC_BIND (ipex-lite-run sets it) that is only the
    # main thread's first OpenMP place
    return CPUInfo.discover(allowed=set(_C.process_cpus()))


def get_core_list_of_node_id(node_id: int) -> List[int]:
    """Physical cores of NUMA node ``node_id`` that this process may use."""
    info = _cpu_info()
    if node_id not in info.nodes:
        raise ValueError(f"get_core_list_of_node_id: no usable CPUs on NUMA node {node_id} (nodes: {info.nodes})")
    return [c for c in info.physical_cores() if info.node_of(c) == node_id]


def is_runtime_ext_enabled() -> bool:
    """IPEX compatibility: the runtime is always available (it needs no special build)."""
    return True


class CPUPool:
    """A set of CPU ids a stream or task runs on (default: every usable physical core)."""

    def __init__(self, core_ids: Optional[Sequence[int]] = None, node_id: Optional[int] = None):
        if core_ids is not None and node_id is not None:
            raise ValueError("CPUPool: give core_ids or node_id, not both")
        if node_id is not None:
            cores = get_core_list_of_node_id(node_id)
        elif core_ids is not None:
            cores = sorted({int(c) for c in core_ids})
            allowed = set(_C.process_cpus())
            bad = [c for c in cores if c not in allowed]
            if bad:
                raise ValueError(f"CPUPool: CPUs {bad} are not available to this process (allowed: "
                                 f"{sorted(allowed)})")
        else:
            cores = _cpu_info().physical_cores()
        if not cores:
            raise ValueError("CPUPool: no CPUs")
        self.core_ids = cores

    def split(self, n: int) -> List["CPUPool"]:
        """n pools of (nearly) equal consecutive core sets."""
        if not 1 <= n <= len(self.core_ids):
            raise ValueError(f"CPUPool.split: cannot make {n} pools from {len(self.core_ids)} cores")
        k, r = divmod(len(self.core_ids), n)
        out, start = [], 0
        for i in range(n):
            size = k + (1 if i < r else 0)
            out.append(CPUPool(core_ids=self.core_ids[start:start + size]))
            start += size
        return out

    def __len__(self) -> int:
        return len(self.core_ids)

    def __repr__(self) -> str:
        return f"CPUPool(core_ids={self.core_ids})"


def _set_team_size(n: int) -> int:
    torch.get_num_threads()  # ATen's one-time per-thread init first, or it would later override ours
    return _C.set_thread_num_threads(n)


def _bind(pool: CPUPool) -> None:
    _C.bind_current_thread(pool.core_ids)
    _set_team_size(len(pool.core_ids))
    _C.bind_team([[c] for c in pool.core_ids])  # one core per OpenMP thread, this thread on the first


@contextlib.contextmanager
def pin(cpu_pool: CPUPool):
    """Runs the block on the calling thread bound to ``cpu_pool`` with an OpenMP team of its size;
    the thread's previous binding and team size come back afterwards."""
    old_cpus = _C.current_thread_affinity()
    old_team = _C.team_affinities()
    old_threads = torch.get_num_threads()  # this thread's OpenMP team size (a per-thread ICV)
    try:
        _bind(cpu_pool)
        yield cpu_pool
    finally:
        _C.set_thread_num_threads(old_threads)
        _C.bind_team(old_team)  # every team thread back where it was
        _C.bind_current_thread(old_cpus)


class TaskFuture(concurrent.futures.Future):
    """The result of an asynchronous ``Task`` call: a ``concurrent.futures.Future`` that also has IPEX's
    ``get()`` (the same as ``result()``)."""

    def get(self, timeout: Optional[float] = None):
        return self.result(timeout)


class Task:
    """A module or function run on its own worker thread bound to ``cpu_pool``.

    As in IPEX, calling the task (or ``run_async``) queues the call and returns a :class:`TaskFuture`
    at once (``future.get()`` waits for the result); ``run_sync`` waits itself.  Calls run in
    submission order."""

    def __init__(self, module_or_fn: Union[nn.Module, Callable], cpu_pool: CPUPool):
        if not callable(module_or_fn):
            raise TypeError("Task: module_or_fn must be callable")
        self.fn, self.cpu_pool = module_or_fn, cpu_pool
        self._queue: "queue.Queue" = queue.Queue()
        self._grad = torch.is_grad_enabled()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._worker, args=(ready,), daemon=True,
                                        name=f"ipex_lite-task-{cpu_pool.core_ids}")
        self._thread.start()
        ready.wait()
        if self._start_error is not None:
            raise self._start_error

    def _worker(self, ready: threading.Event) -> None:
        self._start_error = None
        try:
            _bind(self.cpu_pool)
        except Exception as e:  # noqa: BLE001 - reported to the constructor's caller
            self._start_error = e
        ready.set()
        if self._start_error is not None:
            return
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, args, kwargs, grad = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                with torch.set_grad_enabled(grad):
                    future.set_result(self.fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - surfaces in the caller through the future
                future.set_exception(e)

    def run_async(self, *args, **kwargs) -> TaskFuture:
        if not self._thread.is_alive():
            raise RuntimeError("Task: the worker thread has stopped")
        future = TaskFuture()
        # grad mode is thread-local: the worker uses the caller's
        self._queue.put((future, args, kwargs, torch.is_grad_enabled()))
        return future

    def run_sync(self, *args, **kwargs):
        return self.run_async(*args, **kwargs).result()

    def __call__(self, *args, **kwargs) -> TaskFuture:
        return self.run_async(*args, **kwargs)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def __del__(self):
        try:
            self._queue.put(None)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class MultiStreamModuleHint:
    """Which dimension of each argument is the batch (an int), or None to give the argument whole
    to every stream; nested tuples/lists/dicts mirror the arguments' structure."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


def _split(value, hint, n: int):
    """n pieces of ``value`` along the hinted dimension (tensors), recursing into containers."""
    if isinstance(value, torch.Tensor):
        if hint is None:
            return [value] * n
        return list(torch.tensor_split(value, n, dim=hint))
    if isinstance(value, (list, tuple)):
        hints = hint if isinstance(hint, (list, tuple)) else [hint] * len(value)
        parts = [_split(v, h, n) for v, h in zip(value, hints)]
        return [type(value)(p[i] for p in parts) for i in range(n)]
    if isinstance(value, dict):
        hints = hint if isinstance(hint, dict) else {k: hint for k in value}
        parts = {k: _split(v, hints.get(k), n) for k, v in value.items()}
        return [{k: p[i] for k, p in parts.items()} for i in range(n)]
    return [value] * n


def _concat(pieces: List[Any], hint):
    first = pieces[0]
    if isinstance(first, torch.Tensor):
        if hint is None:
            return first
        return torch.cat(pieces, dim=hint) if first.dim() > 0 else torch.stack(pieces)
    if isinstance(first, (list, tuple)):
        hints = hint if isinstance(hint, (list, tuple)) else [hint] * len(first)
        return type(first)(_concat([p[i] for p in pieces], h) for i, h in enumerate(hints))
    if isinstance(first, dict):
        hints = hint if isinstance(hint, dict) else {k: hint for k in first}
        return {k: _concat([p[k] for p in pieces], hints.get(k)) for k in first}
    return pieces


def _batch_size(value, hint) -> Optional[int]:
    if isinstance(value, torch.Tensor):
        return None if hint is None else value.shape[hint]
    if isinstance(value, (list, tuple)):
        hints = hint if isinstance(hint, (list, tuple)) else [hint] * len(value)
        return next((b for v, h in zip(value, hints) if (b := _batch_size(v, h)) is not None), None)
    if isinstance(value, dict):
        hints = hint if isinstance(hint, dict) else {k: hint for k in value}
        return next((b for k, v in value.items() if (b := _batch_size(v, hints.get(k))) is not None), None)
    return None


class MultiStreamModule(nn.Module):
    """Splits the batch over ``num_streams`` streams (each a Task pinned to its share of
    ``cpu_pool``), runs them concurrently on one shared copy of the weights and joins
    the outputs.  ``num_streams="AUTO"`` uses one stream per 4 cores (one stream below 8
    cores, where splitting a small machine rarely pays).  A batch smaller than the
    number of streams runs unsplit on the calling thread (the process's thread count),
    so a lone sample does not run on one stream's share of the cores."""

    def __init__(self, model: nn.Module, num_streams: Union[int, str] = "AUTO", cpu_pool: Optional[CPUPool] = None,
                 concat_output: bool = True, input_split_hint: Optional[MultiStreamModuleHint] = None,
                 output_concat_hint: Any = 0):
        super().__init__()
        self.model = model
        pool = cpu_pool or CPUPool()
        if num_streams == "AUTO":
            num_streams = 1 if len(pool) < 8 else len(pool) // 4
        if not isinstance(num_streams, int) or num_streams < 1:
            raise ValueError(f"MultiStreamModule: num_streams must be a positive int or 'AUTO', got {num_streams!r}")
        if num_streams > len(pool):
            raise ValueError(f"MultiStreamModule: {num_streams} streams need at least as many cores; the pool has "
                             f"{len(pool)}")
        self.num_streams = num_streams
        self.pools = pool.split(num_streams)
        self.__dict__["tasks"] = [Task(model, p) for p in self.pools]  # worker threads: not state
        self.concat_output = concat_output
        self.input_split_hint = input_split_hint or MultiStreamModuleHint(0)
        self.output_concat_hint = output_concat_hint

    def _arg_hints(self, args, kwargs):
        h = self.input_split_hint
        if len(h.args) == 1 and not h.kwargs:  # one hint for every positional argument
            return [h.args[0]] * len(args), {k: h.args[0] for k in kwargs}
        return list(h.args) + [None] * (len(args) - len(h.args)), {k: h.kwargs.get(k) for k in kwargs}

    def forward(self, *args, **kwargs):
        arg_hints, kw_hints = self._arg_hints(args, kwargs)
        batch = _batch_size(list(args) + list(kwargs.values()), arg_hints + list(kw_hints.values()))
        if self.num_streams == 1:
            return self.tasks[0].run_sync(*args, **kwargs)
        if batch is not None and batch < self.num_streams:
            # too small to occupy every stream: one stream would leave cores idle, so run it here on all
            return self.model(*args, **kwargs)
        n = self.num_streams
        split_args = [_split(a, h, n) for a, h in zip(args, arg_hints)]
        split_kwargs = {k: _split(v, kw_hints[k], n) for k, v in kwargs.items()}
        futures = [self.tasks[i].run_async(*[a[i] for a in split_args], **{k: v[i] for k, v in split_kwargs.items()})
                   for i in range(n)]
        outputs = [f.result() for f in futures]  # the first failing stream's exception is raised here
        return _concat(outputs, self.output_concat_hint) if self.concat_output else outputs

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("tasks", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__["tasks"] = [Task(self.model, p) for p in self.pools]

