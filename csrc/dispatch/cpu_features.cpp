#include "dispatch/isa.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define IPEX_LITE_X86 1
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace ipex_lite {
namespace dispatch {
namespace {

#ifdef IPEX_LITE_X86
void cpuid(unsigned leaf, unsigned sub, unsigned r[4]) {
  __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
}

uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

// Linux hands out the AMX tile data state per process, on request (kernel >= 5.16); oneDNN asks
// the same, so asking here changes nothing for torch.  Other OSes: XCR0 alone decides.
bool request_amx_permission() {
#if defined(__linux__) && defined(__x86_64__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return true;
#endif
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#ifdef IPEX_LITE_X86
  unsigned r[4];
  cpuid(0, 0, r);
  const unsigned max_leaf = r[0];
  char vendor[13] = {0};
  std::memcpy(vendor, &r[1], 4);
  std::memcpy(vendor + 4, &r[3], 4);
  std::memcpy(vendor + 8, &r[2], 4);
  f.vendor = vendor;

  cpuid(0x80000000u, 0, r);
  if (r[0] >= 0x80000004u) {
    char brand[49] = {0};
    for (unsigned i = 0; i < 3; ++i) {
      cpuid(0x80000002u + i, 0, r);
      std::memcpy(brand + 16 * i, r, 16);
    }
    f.brand = brand;
    const auto first = f.brand.find_first_not_of(' ');
    f.brand = first == std::string::npos ? "" : f.brand.substr(first);
  }

  cpuid(1, 0, r);
  const bool osxsave = (r[2] >> 27) & 1;
  f.fma = (r[2] >> 12) & 1;
  f.f16c = (r[2] >> 29) & 1;
  const bool avx = (r[2] >> 28) & 1;
  if (osxsave) {
    const uint64_t xcr0 = xgetbv0();
    f.os_avx = avx && (xcr0 & 0x6) == 0x6;              // XMM + YMM state
    f.os_avx512 = f.os_avx && (xcr0 & 0xe0) == 0xe0;    // opmask + ZMM_Hi256 + Hi16_ZMM
    f.os_amx = (xcr0 & 0x60000) == 0x60000;             // XTILECFG + XTILEDATA
  }
  if (max_leaf >= 7) {
    cpuid(7, 0, r);
    const unsigned leaf7_subleaves = r[0];
    f.avx2 = f.os_avx && ((r[1] >> 5) & 1);
    const bool os512 = f.os_avx512;
    f.avx512f = os512 && ((r[1] >> 16) & 1);
    f.avx512dq = os512 && ((r[1] >> 17) & 1);
    f.avx512bw = os512 && ((r[1] >> 30) & 1);
    f.avx512vl = os512 && ((r[1] >> 31) & 1);
    f.avx512_vnni = os512 && ((r[2] >> 11) & 1);
    f.avx512_fp16 = os512 && ((r[3] >> 23) & 1);
    f.amx_bf16 = f.os_amx && ((r[3] >> 22) & 1);
    f.amx_tile = f.os_amx && ((r[3] >> 24) & 1);
    f.amx_int8 = f.os_amx && ((r[3] >> 25) & 1);
    if (leaf7_subleaves >= 1) {
      cpuid(7, 1, r);
      f.avx_vnni = f.os_avx && ((r[0] >> 4) & 1);
      f.avx512_bf16 = os512 && ((r[0] >> 5) & 1);
    }
  }
  f.fma = f.fma && f.os_avx;
  f.f16c = f.f16c && f.os_avx;
  f.amx_permitted = f.amx_tile && request_amx_permission();
#endif
  return f;
}

IsaLevel env_level(IsaLevel fallback) {
  const char* env = std::getenv("IPEX_LITE_ISA");
  if (env == nullptr || *env == '\0') return fallback;
  IsaLevel requested;
  if (!parse_isa_name(env, &requested)) {
    std::fprintf(stderr,
                 "ipex_lite: IPEX_LITE_ISA='%s' is not one of default|avx2|avx512|avx512_bf16|amx; "
                 "using %s\n", env, isa_name(fallback));
    return fallback;
  }
  if (static_cast<int>(requested) > static_cast<int>(fallback)) {
    std::fprintf(stderr,
                 "ipex_lite: IPEX_LITE_ISA=%s is above what this CPU and build support; using %s\n",
                 env, isa_name(fallback));
    return fallback;
  }
  return requested;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

IsaLevel cpu_isa_level() {
  const CpuFeatures& f = cpu_features();
  const bool avx2 = f.avx2 && f.fma && f.f16c;
  const bool avx512 = avx2 && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq;
  const bool bf16 = avx512 && f.avx512_bf16 && f.avx512_vnni;
  const bool amx = bf16 && f.amx_tile && f.amx_bf16 && f.amx_int8 && f.amx_permitted;
  if (amx) return IsaLevel::kAmx;
  if (bf16) return IsaLevel::kAvx512Bf16;
  if (avx512) return IsaLevel::kAvx512;
  if (avx2) return IsaLevel::kAvx2;
  return IsaLevel::kDefault;
}

IsaLevel built_isa_level() {
#if defined(IPEX_LITE_HAS_AMX) && defined(IPEX_LITE_HAS_AVX512_BF16)
  return IsaLevel::kAmx;
#elif defined(IPEX_LITE_HAS_AVX512_BF16)
  return IsaLevel::kAvx512Bf16;
#elif defined(IPEX_LITE_HAS_AVX512)
  return IsaLevel::kAvx512;
#elif defined(IPEX_LITE_HAS_AVX2)
  return IsaLevel::kAvx2;
#else
  return IsaLevel::kDefault;
#endif
}

IsaLevel active_isa_level() {
  static const IsaLevel level = [] {
    const int cpu = static_cast<int>(cpu_isa_level());
    const int built = static_cast<int>(built_isa_level());
    return env_level(static_cast<IsaLevel>(cpu < built ? cpu : built));
  }();
  return level;
}

const char* isa_name(IsaLevel level) {
  switch (level) {
    case IsaLevel::kAvx2: return "avx2";
    case IsaLevel::kAvx512: return "avx512";
    case IsaLevel::kAvx512Bf16: return "avx512_bf16";
    case IsaLevel::kAmx: return "amx";
    default: return "default";
  }
}

bool parse_isa_name(const std::string& name, IsaLevel* out) {
  for (int i = 0; i <= static_cast<int>(IsaLevel::kAmx); ++i) {
    const auto level = static_cast<IsaLevel>(i);
    if (name == isa_name(level)) {
      *out = level;
      return true;
    }
  }
  return false;
}

}  // namespace dispatch
}  // namespace ipex_lite
