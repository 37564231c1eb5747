// The Python module ipex_lite._C.  Ops register themselves with the
// dispatcher when this library is loaded (TORCH_LIBRARY_FRAGMENT in
// csrc/ops); the module itself exposes CPU/ISA introspection and the
// per-thread binding helpers of ipex_lite.cpu.runtime.
#include <Python.h>
#include <torch/library.h>

#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch/isa.h"
#include "ops/aten_overrides.h"
#include "runtime/thread_binding.h"

// Claims the namespace: a second library defining ipex_lite ops fails loudly.
TORCH_LIBRARY(ipex_lite, m) {}

namespace {

using ipex_lite::dispatch::isa_name;

PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(isa_name(ipex_lite::dispatch::active_isa_level()));
}

int set_flag(PyObject* dict, const char* key, bool value) {
  return PyDict_SetItemString(dict, key, value ? Py_True : Py_False);
}

int set_str(PyObject* dict, const char* key, const char* value) {
  PyObject* s = PyUnicode_FromString(value);
  if (s == nullptr) return -1;
  const int rc = PyDict_SetItemString(dict, key, s);
  Py_DECREF(s);
  return rc;
}

PyObject* isa_info(PyObject*, PyObject*) {
  namespace d = ipex_lite::dispatch;
  const d::CpuFeatures& f = d::cpu_features();
  PyObject* info = PyDict_New();
  if (info == nullptr) return nullptr;
  const bool ok =
      set_str(info, "vendor", f.vendor.c_str()) == 0 && set_str(info, "brand", f.brand.c_str()) == 0 &&
      set_str(info, "cpu_level", isa_name(d::cpu_isa_level())) == 0 &&
      set_str(info, "built_level", isa_name(d::built_isa_level())) == 0 &&
      set_str(info, "active_level", isa_name(d::active_isa_level())) == 0 &&
      set_flag(info, "avx2", f.avx2) == 0 && set_flag(info, "fma", f.fma) == 0 &&
      set_flag(info, "f16c", f.f16c) == 0 && set_flag(info, "avx512f", f.avx512f) == 0 &&
      set_flag(info, "avx512bw", f.avx512bw) == 0 && set_flag(info, "avx512vl", f.avx512vl) == 0 &&
      set_flag(info, "avx512dq", f.avx512dq) == 0 && set_flag(info, "avx512_bf16", f.avx512_bf16) == 0 &&
      set_flag(info, "avx512_vnni", f.avx512_vnni) == 0 &&
      set_flag(info, "avx512_fp16", f.avx512_fp16) == 0 && set_flag(info, "avx_vnni", f.avx_vnni) == 0 &&
      set_flag(info, "amx_tile", f.amx_tile) == 0 && set_flag(info, "amx_bf16", f.amx_bf16) == 0 &&
      set_flag(info, "amx_int8", f.amx_int8) == 0 && set_flag(info, "os_avx512", f.os_avx512) == 0 &&
      set_flag(info, "os_amx", f.os_amx) == 0 && set_flag(info, "amx_permitted", f.amx_permitted) == 0;
  if (!ok) {
    Py_DECREF(info);
    return nullptr;
  }
  return info;
}

PyObject* str_list(const std::vector<std::string>& items) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(items.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < items.size(); ++i) {
    PyObject* s = PyUnicode_FromString(items[i].c_str());
    if (s == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), s);
  }
  return list;
}

PyObject* aten_override_names(PyObject*, PyObject*) { return str_list(ipex_lite::aten_override_names()); }

PyObject* active_aten_overrides(PyObject*, PyObject*) { return str_list(ipex_lite::active_aten_overrides()); }

PyObject* set_aten_override(PyObject*, PyObject* args) {
  const char* name = nullptr;
  int on = 0;
  if (!PyArg_ParseTuple(args, "sp", &name, &on)) return nullptr;
  try {
    return PyBool_FromLong(ipex_lite::set_aten_override(name, on != 0));
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS, "ISA level the kernels run at."},
    {"isa_info", isa_info, METH_NOARGS, "CPU features and the detected/built/active ISA levels."},
    {"bind_current_thread", ipex_lite::runtime::bind_current_thread, METH_O,
     "Restrict the calling OS thread to the given CPU ids."},
    {"current_thread_affinity", ipex_lite::runtime::current_thread_affinity, METH_NOARGS,
     "CPU ids the calling OS thread may run on."},
    {"bind_team", ipex_lite::runtime::bind_team, METH_O,
     "Bind the calling thread's OpenMP team: thread t to the t-th CPU list."},
    {"process_cpus", ipex_lite::runtime::process_cpus, METH_NOARGS,
     "CPU ids this process may use (the thread's mask plus the OpenMP places)."},
    {"set_thread_num_threads", ipex_lite::runtime::set_thread_num_threads, METH_O,
     "OpenMP team size for parallel regions started by the calling thread; returns the previous one."},
    {"team_affinities", ipex_lite::runtime::team_affinities, METH_NOARGS,
     "CPU ids of each thread of an OpenMP team started by the calling thread."},
    {"aten_override_names", aten_override_names, METH_NOARGS, "aten ops ipex_lite can take over at the CPU key."},
    {"active_aten_overrides", active_aten_overrides, METH_NOARGS, "aten ops currently taken over."},
    {"set_aten_override", set_aten_override, METH_VARARGS,
     "set_aten_override(name, on) -> bool: install or remove one override; returns whether it was installed."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "ipex_lite._C", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module_def); }
