// Part of int4_kernel.cc: the float path's tile kernels (float x times
// nibbles expanded in registers): scalar, AVX2 and AVX-512.

#pragma once

#include "problem.h"

namespace lqer {
namespace {

// ---------------------------------------------------------------------------
// Scalar kernels (reference, tails, and the scalar ISA).
// One call: rows of one segment, packed columns [c, c + ncols), tokens
// [t0, t0 + tt). y[t, c..] += scale * sum.

void F32TileScalar(const Problem& P, const Segment& s, int64_t c, int64_t ncols,
                   int64_t t0, int64_t tt) {
  const int64_t H = P.H;
  const float* slo = P.scale + s.group * P.OUT + c;
  const float* shi = slo + H;
  for (int64_t t = t0; t < t0 + tt; ++t) {
    const float* x = P.xm + t * P.ldx;
    float* y = P.y + t * P.OUT + c;
    for (int64_t j = 0; j < ncols; ++j) {
      float lo = 0.f, hi = 0.f;
      const uint8_t* w = P.packed + s.begin * H + c + j;
      for (int64_t i = s.begin; i < s.end; ++i, w += H) {
        lo += x[i] * static_cast<float>(LowNib(*w));
        hi += x[i] * static_cast<float>(HighNib(*w));
      }
      y[j] += slo[j] * lo;
      y[H + j] += shi[j] * hi;
    }
  }
}

// AVX2.

// Float: NC chunks of 8 packed columns (16 outputs: 8 low, 8 high), TT
// tokens. Needs ncols == 8 * NC.
template <int NC, int TT>
LQER_AVX2 void F32TileAvx2(const Problem& P, const Segment& s, int64_t c,
                           int64_t t0) {
  const int64_t H = P.H;
  __m256 acc[TT][NC][2];
  #pragma GCC unroll 16
  for (int t = 0; t < TT; ++t)
    #pragma GCC unroll 16
    for (int k = 0; k < NC; ++k) acc[t][k][0] = acc[t][k][1] = _mm256_setzero_ps();
  const uint8_t* w = P.packed + s.begin * H + c;
  const float* x = P.xm + t0 * P.ldx;
  const int64_t ldx = P.ldx;
  const int64_t pf = P.pf;
  for (int64_t i = s.begin; i < s.end; ++i, w += H) {
    if (pf) _mm_prefetch(reinterpret_cast<const char*>(w + pf), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int k = 0; k < NC; ++k) {
      __m128i b8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + 8 * k));
      __m256i b = _mm256_cvtepu8_epi32(b8);
      __m256 lo = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(b, 28), 28));
      __m256 hi = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(b, 24), 28));
#pragma GCC unroll 8
      for (int t = 0; t < TT; ++t) {
        __m256 xv = _mm256_broadcast_ss(x + t * ldx + i);
        acc[t][k][0] = _mm256_fmadd_ps(xv, lo, acc[t][k][0]);
        acc[t][k][1] = _mm256_fmadd_ps(xv, hi, acc[t][k][1]);
      }
    }
  }
  const float* slo = P.scale + s.group * P.OUT + c;
  #pragma GCC unroll 16
  for (int t = 0; t < TT; ++t) {
    float* y = P.y + (t0 + t) * P.OUT + c;
    #pragma GCC unroll 16
    for (int k = 0; k < NC; ++k) {
      __m256 y0 = _mm256_loadu_ps(y + 8 * k);
      _mm256_storeu_ps(y + 8 * k,
                       _mm256_fmadd_ps(acc[t][k][0], _mm256_loadu_ps(slo + 8 * k), y0));
      __m256 y1 = _mm256_loadu_ps(y + H + 8 * k);
      _mm256_storeu_ps(y + H + 8 * k,
                       _mm256_fmadd_ps(acc[t][k][1], _mm256_loadu_ps(slo + H + 8 * k), y1));
    }
  }
}

// AVX-512.

// Float: NC chunks of 16 packed columns (32 outputs), TT tokens; any
// ncols <= 16 * NC (masked). Nibbles -> floats by vpermps from a 16-entry
// table (vpermps reads only the low 4 bits of each index).
template <int NC, int TT, bool kCvt = false>
LQER_AVX512 void F32TileAvx512(const Problem& P, const Segment& s, int64_t c,
                               int64_t ncols, int64_t t0) {
  const int64_t H = P.H;
  const __m512 lut = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5,
                                    -4, -3, -2, -1);
  __mmask16 m[NC];
  #pragma GCC unroll 16
  for (int k = 0; k < NC; ++k) m[k] = Mask16(ncols - 16 * k);
  __m512 acc[TT][NC][2];
  #pragma GCC unroll 16
  for (int t = 0; t < TT; ++t)
    #pragma GCC unroll 16
    for (int k = 0; k < NC; ++k) acc[t][k][0] = acc[t][k][1] = _mm512_setzero_ps();
  const uint8_t* w = P.packed + s.begin * H + c;
  const float* x = P.xm + t0 * P.ldx;
  const int64_t ldx = P.ldx;
  const int64_t pf = P.pf;
  for (int64_t i = s.begin; i < s.end; ++i, w += H) {
    if (pf) _mm_prefetch(reinterpret_cast<const char*>(w + pf), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int k = 0; k < NC; ++k) {
      __m512i b = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m[k], w + 16 * k));
      __m512 lo, hi;
      if constexpr (kCvt) {
        lo = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 28), 28));
        hi = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 24), 28));
      } else {
        lo = _mm512_permutexvar_ps(b, lut);
        hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut);
      }
#pragma GCC unroll 8
      for (int t = 0; t < TT; ++t) {
        __m512 xv = _mm512_set1_ps(x[t * ldx + i]);
        acc[t][k][0] = _mm512_fmadd_ps(xv, lo, acc[t][k][0]);
        acc[t][k][1] = _mm512_fmadd_ps(xv, hi, acc[t][k][1]);
      }
    }
  }
  const float* slo = P.scale + s.group * P.OUT + c;
  #pragma GCC unroll 16
  for (int t = 0; t < TT; ++t) {
    float* y = P.y + (t0 + t) * P.OUT + c;
    #pragma GCC unroll 16
    for (int k = 0; k < NC; ++k) {
      #pragma GCC unroll 16
      for (int h = 0; h < 2; ++h) {
        const int64_t off = 16 * k + h * H;
        __m512 sc = _mm512_maskz_loadu_ps(m[k], slo + off);
        __m512 yv = _mm512_maskz_loadu_ps(m[k], y + off);
        _mm512_mask_storeu_ps(y + off, m[k], _mm512_fmadd_ps(acc[t][k][h], sc, yv));
      }
    }
  }
}

// Float, "dword mode": 64 packed columns a row, loaded as 16 dwords (dword
// k = columns 4k..4k+3) with no byte expansion; each nibble is moved to the
// top of its dword and sign-extended by shifts (kMagic: or to the low bits
// and made a float 2^23 + 8 + q by one ternary-logic op, then - (2^23 + 8)),
// converted and multiplied in. No shuffles in the row loop (vpermps is a
// 2-cycle shuffle on some cores); the flush undoes the column interleave
// (accumulator j holds columns 4k + j) with vpermt2ps.
template <int TT, int kMode>  // 0: shift + cvt, 1: magic, 2: offset loads + vpermps
LQER_AVX512 void F32TileAvx512Dw(const Problem& P, const Segment& s, int64_t c,
                                 int64_t ncols, int64_t t0) {
  const int64_t H = P.H;
  const __mmask64 m64 = ncols >= 64 ? ~0ull : ((1ull << ncols) - 1);
  __m512 acc[TT][4][2];
  #pragma GCC unroll 16
  for (int t = 0; t < TT; ++t)
    #pragma GCC unroll 16
    for (int j = 0; j < 4; ++j) acc[t][j][0] = acc[t][j][1] = _mm512_setzero_ps();
  const uint8_t* w = P.packed + s.begin * H + c;
  const float* x = P.xm + t0 * P.ldx;
  const int64_t ldx = P.ldx;
  const int64_t pf = P.pf;
  const __m512i m0f = _mm512_set1_epi32(0xf);
  const __m512i magic_bits = _mm512_set1_epi32(0x4b000008);
  const __m512 magic = _mm512_set1_ps(8388616.0f);  // 2^23 + 8
  constexpr int kTernAndXor = ((0xf0 & 0xcc) ^ 0xaa);
  const __m512 lut = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5,
                                    -4, -3, -2, -1);
  __mmask64 mj[4];
  #pragma GCC unroll 16
  for (int j = 0; j < 4; ++j) {
    const int64_t n = ncols - j;
    mj[j] = n >= 64 ? ~0ull : (n <= 0 ? 0ull : ((1ull << n) - 1));
  }
  for (int64_t i = s.begin; i < s.end; ++i, w += H) {
    if (pf) _mm_prefetch(reinterpret_cast<const char*>(w + pf), _MM_HINT_T0);
    __m512 xv[TT];
    #pragma GCC unroll 16
    for (int t = 0; t < TT; ++t) xv[t] = _mm512_set1_ps(x[t * ldx + i]);
    if constexpr (kMode == 2) {
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {  // dword k's low byte = column 4k + j
        const __m512i v = _mm512_maskz_loadu_epi8(mj[j], w + j);
        const __m512 lo = _mm512_permutexvar_ps(v, lut);
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
        #pragma GCC unroll 16
        for (int t = 0; t < TT; ++t) {
          acc[t][j][0] = _mm512_fmadd_ps(xv[t], lo, acc[t][j][0]);
          acc[t][j][1] = _mm512_fmadd_ps(xv[t], hi, acc[t][j][1]);
        }
      }
      continue;
    }
    const __m512i v = _mm512_maskz_loadu_epi8(m64, w);
#pragma GCC unroll 8
    for (int p = 0; p < 8; ++p) {  // nibble p of each dword: byte p/2, half p%2
      __m512 wf;
      if constexpr (kMode == 1) {
        __m512i sh = p ? _mm512_srli_epi32(v, 4 * p) : v;
        wf = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_ternarylogic_epi32(
                               sh, m0f, magic_bits, kTernAndXor)),
                           magic);
      } else {
        __m512i sh = p == 7 ? v : _mm512_slli_epi32(v, 28 - 4 * p);
        wf = _mm512_cvtepi32_ps(_mm512_srai_epi32(sh, 28));
      }
      #pragma GCC unroll 16
      for (int t = 0; t < TT; ++t)
        acc[t][p >> 1][p & 1] = _mm512_fmadd_ps(xv[t], wf, acc[t][p >> 1][p & 1]);
    }
  }
  // Un-interleave: natural vector m (columns 16m..16m+15), lane l =
  // acc[l % 4][4m + l / 4].
  alignas(64) static const int32_t kI1[2][16] = {
      {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23},
      {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31}};
  alignas(64) static const int32_t kI2[2][16] = {
      {0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23},
      {8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31}};
  const __m512i i1lo = _mm512_load_si512(kI1[0]), i1hi = _mm512_load_si512(kI1[1]);
  const __m512i i2e = _mm512_load_si512(kI2[0]), i2o = _mm512_load_si512(kI2[1]);
  const float* slo = P.scale + s.group * P.OUT + c;
  #pragma GCC unroll 16
  for (int t = 0; t < TT; ++t) {
    float* y = P.y + (t0 + t) * P.OUT + c;
    #pragma GCC unroll 16
    for (int h = 0; h < 2; ++h) {
      const __m512 b01l = _mm512_permutex2var_ps(acc[t][0][h], i1lo, acc[t][1][h]);
      const __m512 b01h = _mm512_permutex2var_ps(acc[t][0][h], i1hi, acc[t][1][h]);
      const __m512 b23l = _mm512_permutex2var_ps(acc[t][2][h], i1lo, acc[t][3][h]);
      const __m512 b23h = _mm512_permutex2var_ps(acc[t][2][h], i1hi, acc[t][3][h]);
      __m512 o[4];
      o[0] = _mm512_permutex2var_ps(b01l, i2e, b23l);
      o[1] = _mm512_permutex2var_ps(b01l, i2o, b23l);
      o[2] = _mm512_permutex2var_ps(b01h, i2e, b23h);
      o[3] = _mm512_permutex2var_ps(b01h, i2o, b23h);
      #pragma GCC unroll 16
      for (int mm = 0; mm < 4; ++mm) {
        const __mmask16 mk = Mask16(ncols - 16 * mm);
        if (!mk) break;
        const int64_t off = 16 * mm + h * H;
        __m512 sc = _mm512_maskz_loadu_ps(mk, slo + off);
        __m512 yv = _mm512_maskz_loadu_ps(mk, y + off);
        _mm512_mask_storeu_ps(y + off, mk, _mm512_fmadd_ps(o[mm], sc, yv));
      }
    }
  }
}

}  // namespace
}  // namespace lqer
