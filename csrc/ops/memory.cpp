// ipex_lite::advise_hugepages: asks the kernel to back a tensor's memory
// with transparent huge pages.  Embedding tables are read at random rows:
// with 4 KiB pages nearly every lookup also misses the TLB, with 2 MiB pages
// the page walks mostly disappear.  Best called before the memory is first
// written (the pages are then allocated huge); on already-touched memory
// khugepaged may collapse them later.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace ipex_lite {
namespace {

bool advise_hugepages_cpu(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "advise_hugepages: expected a CPU tensor, got ", t.device());
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!t.has_storage() || t.storage().nbytes() == 0) return false;
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.storage().data());
  const uintptr_t end = begin + t.storage().nbytes();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = end & ~(kHuge - 1);
  if (last <= first) return false;  // smaller than one aligned huge page
  return madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE) == 0;
#else
  (void)t;
  return false;
#endif
}

}  // namespace
}  // namespace ipex_lite

TORCH_LIBRARY_FRAGMENT(ipex_lite, m) {
  m.def("advise_hugepages(Tensor self) -> bool");
}

TORCH_LIBRARY_IMPL(ipex_lite, CPU, m) {
  m.impl("advise_hugepages", &ipex_lite::advise_hugepages_cpu);
}
