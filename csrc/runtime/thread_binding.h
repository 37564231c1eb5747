// Per-thread CPU binding and OpenMP team size for ipex_lite.cpu.runtime
// (CPU pools and streams).  Plain CPython functions of ipex_lite._C.
#pragma once

#include <Python.h>

namespace ipex_lite {
namespace runtime {

// bind_current_thread(cpus) -> None: the calling OS thread runs only on these CPUs.
PyObject* bind_current_thread(PyObject*, PyObject* cpus);
// current_thread_affinity() -> list[int]
PyObject* current_thread_affinity(PyObject*, PyObject*);
// process_cpus() -> list[int]: the CPUs this process may use: the calling thread's mask plus the
// OpenMP places (OMP_PROC_BIND narrows the initial thread's own mask to its first place).
PyObject* process_cpus(PyObject*, PyObject*);
// bind_team(per_thread) -> None: a parallel region of len(per_thread) threads, thread t (the
// caller is thread 0) bound to per_thread[t].  OpenMP keeps team threads and reuses them in later
// regions, so the binding stays; without it they keep the mask they were created with, or the
// place OMP_PROC_BIND gave them (which ignores the caller's own mask).
PyObject* bind_team(PyObject*, PyObject* per_thread);
// set_thread_num_threads(n) -> int: OpenMP team size for parallel regions this thread starts
// (a per-thread ICV in GNU and Intel OpenMP); returns the previous value.  ATen sets a
// thread's team size once, lazily, from the process-wide torch.set_num_threads value:
// call torch.get_num_threads() on the thread first so that cannot override this later.
PyObject* set_thread_num_threads(PyObject*, PyObject* n);
// team_affinities() -> list[list[int]]: each thread of an OpenMP team started here, as the OS sees it.
PyObject* team_affinities(PyObject*, PyObject*);

}  // namespace runtime
}  // namespace ipex_lite
