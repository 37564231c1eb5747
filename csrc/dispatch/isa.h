// ISA levels, CPU feature detection and per-level kernel tables.
//
// Kernel files are compiled once per level, each inside namespace
// ipex_lite::kernels::<level>.  An op asks for the table of the active level
// through IPEX_LITE_KERNEL_TABLE(getter); levels the compiler could not build
// are absent (IPEX_LITE_HAS_<LEVEL> undefined) and never selected.
//
// The amx level is avx512_bf16 on a CPU whose OS lets this process use AMX tiles.  No kernel of
// ours uses tiles yet (oneDNN does, through torch's GEMMs and convolutions), so it runs the
// avx512_bf16 kernel tables; a tile kernel gets its own file compiled with -mamx-* flags.
#pragma once

#include <cstdint>
#include <string>

namespace ipex_lite {
namespace dispatch {

enum class IsaLevel : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_bf16 = false, avx512_vnni = false, avx512_fp16 = false, avx_vnni = false;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
  bool os_avx = false, os_avx512 = false, os_amx = false;  // XCR0 says the OS saves the state
  bool amx_permitted = false;  // Linux granted this process the tile data state (arch_prctl)
  std::string vendor, brand;
};

const CpuFeatures& cpu_features();
IsaLevel cpu_isa_level();    // highest level this CPU (and OS) can run
IsaLevel built_isa_level();  // highest level compiled into this build
// min(cpu, built), lowered by IPEX_LITE_ISA when set; computed once per process.
IsaLevel active_isa_level();
const char* isa_name(IsaLevel level);
// Parses "default|avx2|avx512|avx512_bf16|amx"; returns false on anything else.
bool parse_isa_name(const std::string& name, IsaLevel* out);

}  // namespace dispatch
}  // namespace ipex_lite

// Declares `const Table& getter()` in every built level's namespace.
#define IPEX_LITE_DECLARE_KERNEL_TABLE(Table, getter)                \
  namespace ipex_lite { namespace kernels {                          \
  namespace default_isa { const Table& getter(); }                   \
  IPEX_LITE_IF_AVX2(namespace avx2 { const Table& getter(); })       \
  IPEX_LITE_IF_AVX512(namespace avx512 { const Table& getter(); })   \
  IPEX_LITE_IF_AVX512_BF16(namespace avx512_bf16 { const Table& getter(); }) \
  } }

#if defined(IPEX_LITE_HAS_AVX2)
#define IPEX_LITE_IF_AVX2(...) __VA_ARGS__
#else
#define IPEX_LITE_IF_AVX2(...)
#endif
#if defined(IPEX_LITE_HAS_AVX512)
#define IPEX_LITE_IF_AVX512(...) __VA_ARGS__
#else
#define IPEX_LITE_IF_AVX512(...)
#endif
#if defined(IPEX_LITE_HAS_AVX512_BF16)
#define IPEX_LITE_IF_AVX512_BF16(...) __VA_ARGS__
#else
#define IPEX_LITE_IF_AVX512_BF16(...)
#endif
#if defined(IPEX_LITE_HAS_AMX) && defined(IPEX_LITE_HAS_AVX512_BF16)
#define IPEX_LITE_IF_AMX(...) __VA_ARGS__
#else
#define IPEX_LITE_IF_AMX(...)
#endif

// The table of the active level.  active_isa_level() never returns a level
// that was not built, so the fall-through is the baseline; amx falls through to avx512_bf16.
#define IPEX_LITE_KERNEL_TABLE(getter)                                          \
  ([]() -> decltype(::ipex_lite::kernels::default_isa::getter()) {             \
    switch (::ipex_lite::dispatch::active_isa_level()) {                       \
      IPEX_LITE_IF_AMX(case ::ipex_lite::dispatch::IsaLevel::kAmx:)            \
      IPEX_LITE_IF_AVX512_BF16(case ::ipex_lite::dispatch::IsaLevel::kAvx512Bf16: \
                                 return ::ipex_lite::kernels::avx512_bf16::getter();) \
      IPEX_LITE_IF_AVX512(case ::ipex_lite::dispatch::IsaLevel::kAvx512:       \
                            return ::ipex_lite::kernels::avx512::getter();)    \
      IPEX_LITE_IF_AVX2(case ::ipex_lite::dispatch::IsaLevel::kAvx2:           \
                          return ::ipex_lite::kernels::avx2::getter();)        \
      default:                                                                 \
        return ::ipex_lite::kernels::default_isa::getter();                    \
    }                                                                          \
  }())
