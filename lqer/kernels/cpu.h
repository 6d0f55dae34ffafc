// Part of int4_kernel.cc (one translation unit): system headers, the
// per-function target attributes, the instruction set chosen at run
// time (cpuid, capped by LQER_ISA) and the environment knobs.

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#define LQER_AVX2 __attribute__((target("avx2,fma,bmi2")))
#define LQER_AVX512 \
  __attribute__((target("avx2,fma,bmi2,avx512f,avx512bw,avx512vl,avx512dq")))
#define LQER_VNNI                                                          \
  __attribute__((target("avx2,fma,bmi2,avx512f,avx512bw,avx512vl,avx512dq," \
                        "avx512vnni,avx512vbmi")))
#define LQER_BF16                                                          \
  __attribute__((target("avx2,fma,bmi2,avx512f,avx512bw,avx512vl,avx512dq," \
                        "avx512vnni,avx512vbmi,avx512bf16")))
#define LQER_INLINE inline __attribute__((always_inline))

namespace lqer {
namespace {

// ---------------------------------------------------------------------------
// Instruction set selection.

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vnni = 3 };
const char* const kIsaNames[] = {"scalar", "avx2", "avx512", "avx512vnni"};

int DetectIsa() {
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("bmi2")))
    return kScalar;
  if (!(__builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq")))
    return kAvx2;
  if (!(__builtin_cpu_supports("avx512vnni") &&
        __builtin_cpu_supports("avx512vbmi")))
    return kAvx512;
  return kAvx512Vnni;
}

int HardwareIsa() {
  static const int isa = DetectIsa();
  return isa;
}

// AVX-512 BF16 (vdpbf16ps), used by the float path for bfloat16 inputs
// from kBf16MinT tokens on, where the ISA in use is avx512vnni.
bool HardwareBf16() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return has;
}

// The ISA used by a call: the hardware's, capped by LQER_ISA.
int CurrentIsa() {
  int isa = HardwareIsa();
  const char* e = std::getenv("LQER_ISA");
  if (e && *e) {
    std::string s(e);
    int want = isa;
    if (s == "scalar") want = kScalar;
    else if (s == "avx2") want = kAvx2;
    else if (s == "avx512") want = kAvx512;
    else if (s == "avx512vnni" || s == "vnni") want = kAvx512Vnni;
    isa = std::min(isa, want);
  }
  return isa;
}

int64_t EnvInt(const char* name, int64_t dflt) {
  const char* e = std::getenv(name);
  if (!e || !*e) return dflt;
  char* end = nullptr;
  long long v = std::strtoll(e, &end, 10);
  return (end && *end == 0) ? v : dflt;
}

int NumThreads() {
  int64_t n = EnvInt("LQER_NUM_THREADS", 0);
  if (n <= 0) n = std::max(1u, std::thread::hardware_concurrency());
  return static_cast<int>(std::min<int64_t>(n, 256));
}

}  // namespace
}  // namespace lqer
