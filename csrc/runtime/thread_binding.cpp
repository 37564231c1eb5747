// Why C++: OpenMP's team size is a per-thread ICV that only omp_set_num_threads
// in that thread changes (torch.set_num_threads also sets a process-wide value
// that new threads copy), and a thread's
// CPU mask must be set by sched_setaffinity on that thread; OpenMP team threads
// started afterwards inherit it.
#include "runtime/thread_binding.h"

#include <omp.h>
#include <sched.h>

#include <vector>

namespace ipex_lite {
namespace runtime {
namespace {

PyObject* cpu_list(const cpu_set_t& set) {
  PyObject* out = PyList_New(0);
  if (out == nullptr) return nullptr;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (!CPU_ISSET(c, &set)) continue;
    PyObject* v = PyLong_FromLong(c);
    if (v == nullptr || PyList_Append(out, v) != 0) {
      Py_XDECREF(v);
      Py_DECREF(out);
      return nullptr;
    }
    Py_DECREF(v);
  }
  return out;
}

// Fills `set` from a Python sequence of CPU ids; false with a Python error
// set (the value errors name the caller `fn`) when it is not one, holds an id out of range,
// or is empty.
bool cpu_set_from(PyObject* cpus, const char* fn, cpu_set_t* set) {
  PyObject* seq = PySequence_Fast(cpus, "a CPU list must be a sequence of CPU ids");
  if (seq == nullptr) return false;
  CPU_ZERO(set);
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  for (Py_ssize_t i = 0; i < n; ++i) {
    const long c = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
    if (c == -1 && PyErr_Occurred()) {
      Py_DECREF(seq);
      return false;
    }
    if (c < 0 || c >= CPU_SETSIZE) {
      Py_DECREF(seq);
      PyErr_Format(PyExc_ValueError, "%s: CPU id %ld out of range [0, %d)", fn, c, CPU_SETSIZE);
      return false;
    }
    CPU_SET(static_cast<int>(c), set);
  }
  Py_DECREF(seq);
  if (n == 0) {
    PyErr_Format(PyExc_ValueError, "%s: empty CPU list", fn);
    return false;
  }
  return true;
}

}  // namespace

PyObject* bind_current_thread(PyObject*, PyObject* cpus) {
  cpu_set_t set;
  if (!cpu_set_from(cpus, "bind_current_thread", &set)) return nullptr;
  if (sched_setaffinity(0, sizeof(set), &set) != 0) return PyErr_SetFromErrno(PyExc_OSError);
  Py_RETURN_NONE;
}

PyObject* bind_team(PyObject*, PyObject* per_thread) {
  PyObject* seq = PySequence_Fast(per_thread, "bind_team: expected one CPU list per team thread");
  if (seq == nullptr) return nullptr;
  std::vector<cpu_set_t> sets(static_cast<size_t>(PySequence_Fast_GET_SIZE(seq)));
  for (size_t t = 0; t < sets.size(); ++t) {
    if (!cpu_set_from(PySequence_Fast_GET_ITEM(seq, t), "bind_team", &sets[t])) {
      Py_DECREF(seq);
      return nullptr;
    }
  }
  Py_DECREF(seq);
  if (sets.empty()) return PyErr_Format(PyExc_ValueError, "bind_team: no team threads");
  int failed = 0;
  Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(static_cast<int>(sets.size())) reduction(+ : failed)
  failed += sched_setaffinity(0, sizeof(cpu_set_t), &sets[static_cast<size_t>(omp_get_thread_num())]) != 0;
  Py_END_ALLOW_THREADS
  if (failed != 0) return PyErr_SetFromErrno(PyExc_OSError);
  Py_RETURN_NONE;
}

PyObject* current_thread_affinity(PyObject*, PyObject*) {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return PyErr_SetFromErrno(PyExc_OSError);
  return cpu_list(set);
}

PyObject* process_cpus(PyObject*, PyObject*) {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return PyErr_SetFromErrno(PyExc_OSError);
  // With OMP_PROC_BIND set, the OpenMP runtime binds the initial thread to its first place when
  // it loads, which hides the rest of the process's CPUs from sched_getaffinity; the places
  // still list them.
  for (int p = 0; p < omp_get_num_places(); ++p) {
    std::vector<int> ids(static_cast<size_t>(omp_get_place_num_procs(p)));
    omp_get_place_proc_ids(p, ids.data());
    for (int c : ids)
      if (c >= 0 && c < CPU_SETSIZE) CPU_SET(c, &set);
  }
  return cpu_list(set);
}

PyObject* set_thread_num_threads(PyObject*, PyObject* arg) {
  const long n = PyLong_AsLong(arg);
  if (n == -1 && PyErr_Occurred()) return nullptr;
  if (n < 1) return PyErr_Format(PyExc_ValueError, "set_thread_num_threads: need at least 1 thread, got %ld", n);
  const int previous = omp_get_max_threads();
  omp_set_num_threads(static_cast<int>(n));
  return PyLong_FromLong(previous);
}

PyObject* team_affinities(PyObject*, PyObject*) {
  std::vector<cpu_set_t> sets;
  Py_BEGIN_ALLOW_THREADS
#pragma omp parallel
  {
#pragma omp single
    sets.resize(omp_get_num_threads());
    cpu_set_t s;
    CPU_ZERO(&s);
    sched_getaffinity(0, sizeof(s), &s);
    sets[omp_get_thread_num()] = s;
  }
  Py_END_ALLOW_THREADS
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(sets.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < sets.size(); ++i) {
    PyObject* l = cpu_list(sets[i]);
    if (l == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyList_SET_ITEM(out, static_cast<Py_ssize_t>(i), l);
  }
  return out;
}

}  // namespace runtime
}  // namespace ipex_lite
