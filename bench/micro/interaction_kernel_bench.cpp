// Kernel-level timing of the interaction kernels, without torch: isolates
// the per-sample cost (ns/sample) from allocation, dispatch and autograd.
//   bench/micro/run.sh [dim] [batch]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernels/interaction_kernel.h"

namespace ipex_lite {
namespace kernels {
namespace IPEX_LITE_ISA_NS {
const InteractionKernels& interaction_kernels();
}
}  // namespace kernels
}  // namespace ipex_lite

using namespace ipex_lite::kernels;

template <typename F>
double best_ns_per_sample(F&& f, int64_t batch) {
  double best = 1e30;
  for (int r = 0; r < 15; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 10; ++i) f();
    const auto t1 = std::chrono::steady_clock::now();
    const double ns = std::chrono::duration<double, std::nano>(t1 - t0).count() / 10 / batch;
    if (ns < best) best = ns;
  }
  return best;
}

int main(int argc, char** argv) {
  const int64_t n = 27, d = argc > 1 ? std::atoi(argv[1]) : 128, batch = argc > 2 ? std::atoi(argv[2]) : 2048;
  const int64_t cols = d + n * (n - 1) / 2;
  const auto& k = IPEX_LITE_ISA_NS::interaction_kernels();
  // Page-aligned separate buffers, as torch's allocator hands out for large tensors.
  auto alloc = [](size_t bytes) {
    void* p = nullptr;
    if (posix_memalign(&p, 4096, bytes) != 0) std::abort();
    std::memset(p, 0, bytes);
    return p;
  };
  for (int dt = 0; dt < 2; ++dt) {
    const size_t es = dt == 0 ? 4 : 2;
    std::vector<const void*> in;
    std::vector<void*> gin;
    std::vector<int64_t> strides(n, d);
    for (int64_t i = 0; i < n; ++i) {
      void* p = alloc(batch * d * es);
      if (dt == 0) {
        for (int64_t e = 0; e < batch * d; ++e) static_cast<float*>(p)[e] = (e % 97) * 0.01f;
      } else {
        for (int64_t e = 0; e < batch * d; ++e) static_cast<uint16_t*>(p)[e] = 0x3f80 + (e % 97);
      }
      in.push_back(p);
      gin.push_back(alloc(batch * d * es));
    }
    void* out = alloc(batch * cols * es);
    void* grad = alloc(batch * cols * es);
    std::memcpy(grad, out, 0);
    void* fs = alloc(interaction_fwd_scratch_bytes(n, d));
    void* bs = alloc(interaction_bwd_scratch_bytes(n, d));
    InteractionFwdArgs fa{in.data(), strides.data(), n, d, out};
    InteractionBwdArgs ba{grad, cols, in.data(), strides.data(), gin.data(), n, d};
    const double f = best_ns_per_sample([&] { k.forward[dt](fa, 0, batch, fs); }, batch);
    const double b = best_ns_per_sample([&] { k.backward[dt](ba, 0, batch, bs); }, batch);
    std::printf("%s n=%ld d=%ld batch=%ld: forward %.0f ns/sample, backward %.0f ns/sample (one thread)\n",
                dt == 0 ? "fp32" : "bf16", n, d, batch, f, b);
  }
  return 0;
}
