// Part of int4_kernel.cc: scalar helpers, masks, and the problem (one
// call's shapes and buffers) as the tile kernels see it.

#pragma once

#include "cpu.h"

namespace lqer {
namespace {

// ---------------------------------------------------------------------------
// Scalar helpers.

LQER_INLINE float Bf16ToF32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to the nearest bfloat16 (ties to even), returned as float.
LQER_INLINE float RoundBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return f;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  u &= 0xffff0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

// The 16 bits of a float that holds a bfloat16 value (exact).
LQER_INLINE uint32_t Bf16Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u >> 16;
}

// Round half to even for |v| < 2^22 (exact float arithmetic; this file is
// compiled without -ffast-math and this function has no FMA to contract to).
LQER_INLINE float RoundEvenSmall(float v) {
  const float magic = 12582912.0f;  // 1.5 * 2^23
  const float t = v + magic;
  return t - magic;
}

LQER_INLINE int8_t SatS8(float r) {
  if (!(r == r)) return 0;  // NaN -> 0 (XLA's saturating convert)
  if (r >= 127.0f) return 127;
  if (r <= -128.0f) return -128;
  return static_cast<int8_t>(static_cast<int>(r));
}

LQER_INLINE int LowNib(uint8_t p) { return static_cast<int8_t>(p << 4) >> 4; }
LQER_INLINE int HighNib(uint8_t p) { return static_cast<int8_t>(p) >> 4; }

enum FDtype : int { kF32 = 0, kBF16 = 1, kS8 = 2 };

template <int D>
LQER_INLINE float LoadAs(const void* p, int64_t i) {
  if constexpr (D == kF32) return static_cast<const float*>(p)[i];
  else if constexpr (D == kBF16) return Bf16ToF32(static_cast<const uint16_t*>(p)[i]);
  else return static_cast<float>(static_cast<const int8_t*>(p)[i]);
}

// ---------------------------------------------------------------------------
// The problem, as the kernels see it.

struct Segment {
  int64_t begin, end;
  int64_t group;  // scale row
  int64_t act;    // activation tile (A8)
};

struct Problem {
  int64_t T, IN, H, OUT, G, R;
  const uint8_t* packed;
  const float* scale;  // (G, OUT)
  // Float path: main input xm (T, IN), row stride ldx.
  const float* xm = nullptr;
  int64_t ldx = 0;
  // A8 path.
  const int8_t* xq = nullptr;  // (T, ldq), zero padded
  int64_t ldq = 0;
  const int32_t* xsum = nullptr;  // (T, nseg)
  const float* sact = nullptr;    // (T, nact)
  int64_t nact = 1;
  const uint8_t* pad_row = nullptr;  // H bytes of 0x88 (q = -8 | -8)
  // Segments: runs of rows with one scale group, one act tile, one row block.
  const Segment* seg = nullptr;
  int64_t nseg = 0;
  const int64_t* block_seg = nullptr;  // row block k: segments [bs[k], bs[k+1])
  int64_t nblocks = 0;
  // Branch: y starts as xa (T, R) @ b (R, OUT).
  const float* xa = nullptr;
  const void* b = nullptr;
  int b_dtype = kF32;
  float* y;  // (T, OUT)
  int isa = kScalar;
  bool a8 = false;
  int64_t pf = 0;  // software prefetch distance (bytes, same row)
  // A8 panel path (VNNI, T >= 2 * kPanelTT, every segment starts at a row
  // multiple of 4): activations as dwords interleaved per token block,
  // xqi[(tb * nsteps + step) * kPanelTT + t] = xq[tb * kPanelTT + t][4 step ..].
  const int32_t* xqi = nullptr;
  int64_t nsteps = 0;
  // bf16 panel path (bfloat16 x, AVX-512 BF16, every segment starts at an
  // even row): x as bf16 pairs interleaved per token block,
  // xbi[(tb * npairs + pair) * kBf16TT + t] = x[tb * kBf16TT + t][2 pair ..].
  const uint32_t* xbi = nullptr;
  int64_t npairs = 0;
  // Branch in bf16 (InitYBf16): xa as bf16 pairs, (T, (R + 1) / 2) dwords.
  const uint32_t* xab = nullptr;
  int f32_mode = 0;  // T=1 float dequant: 0 vpermps, 1 cvt, 2 dword, 3 magic, 4 offset loads
};

LQER_AVX512 LQER_INLINE __mmask16 Mask16(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff)
                 : (n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1));
}

LQER_AVX512 LQER_INLINE __mmask32 Mask32(int64_t n) {
  return n >= 32 ? ~__mmask32{0} : (n <= 0 ? 0 : (__mmask32{1} << n) - 1);
}

}  // namespace
}  // namespace lqer
