// Part of int4_kernel.cc: the W4A8 path's tile kernels (int8 x, integer
// dot products per scale group): scalar, AVX2 and AVX-512 VNNI.

#pragma once

#include "problem.h"

namespace lqer {
namespace {

void A8TileScalar(const Problem& P, int64_t si, int64_t c, int64_t ncols,
                  int64_t t0, int64_t tt) {
  const Segment& s = P.seg[si];
  const int64_t H = P.H;
  const float* slo = P.scale + s.group * P.OUT + c;
  const float* shi = slo + H;
  for (int64_t t = t0; t < t0 + tt; ++t) {
    const int8_t* xq = P.xq + t * P.ldq;
    const float st = P.sact[t * P.nact + s.act];
    float* y = P.y + t * P.OUT + c;
    for (int64_t j = 0; j < ncols; ++j) {
      int32_t lo = 0, hi = 0;
      const uint8_t* w = P.packed + s.begin * H + c + j;
      for (int64_t i = s.begin; i < s.end; ++i, w += H) {
        lo += xq[i] * LowNib(*w);
        hi += xq[i] * HighNib(*w);
      }
      y[j] += static_cast<float>(lo) * (slo[j] * st);
      y[H + j] += static_cast<float>(hi) * (shi[j] * st);
    }
  }
}

// W4A8 with vpmaddubsw / vpmaddwd: 16 packed columns, TT tokens, 4 rows a
// step (bytes of rows i..i+3 interleaved per column, weights as unsigned
// q + 8, activations signed; acc starts at -8 * sum(xq)).
template <int TT>
LQER_AVX2 void A8TileAvx2(const Problem& P, int64_t si, int64_t c, int64_t t0) {
  const Segment& s = P.seg[si];
  const int64_t H = P.H;
  __m256i acc[TT][4];
  #pragma GCC unroll 16
  for (int t = 0; t < TT; ++t) {
    __m256i init = _mm256_set1_epi32(-8 * P.xsum[(t0 + t) * P.nseg + si]);
    #pragma GCC unroll 16
    for (int k = 0; k < 4; ++k) acc[t][k] = init;
  }
  const __m256i x88 = _mm256_set1_epi8(static_cast<char>(0x88));
  const __m256i m0f = _mm256_set1_epi8(0x0f);
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t rows = s.end - s.begin;
  const int64_t nblk = (rows + 3) / 4;
  const int8_t* xq = P.xq + t0 * P.ldq + s.begin;
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t i = s.begin + 4 * b;
    const uint8_t* r[4];
    #pragma GCC unroll 16
    for (int k = 0; k < 4; ++k)
      r[k] = (i + k < s.end) ? P.packed + (i + k) * H + c : P.pad_row;
    __m128i a0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[0]));
    __m128i a1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[1]));
    __m128i a2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[2]));
    __m128i a3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[3]));
    __m128i t0v = _mm_unpacklo_epi8(a0, a1), t1v = _mm_unpackhi_epi8(a0, a1);
    __m128i t2v = _mm_unpacklo_epi8(a2, a3), t3v = _mm_unpackhi_epi8(a2, a3);
    __m256i A = _mm256_set_m128i(_mm_unpackhi_epi16(t0v, t2v), _mm_unpacklo_epi16(t0v, t2v));
    __m256i B = _mm256_set_m128i(_mm_unpackhi_epi16(t1v, t3v), _mm_unpacklo_epi16(t1v, t3v));
    A = _mm256_xor_si256(A, x88);
    B = _mm256_xor_si256(B, x88);
    __m256i w[4];
    w[0] = _mm256_and_si256(A, m0f);                          // low, cols 0-7
    w[1] = _mm256_and_si256(B, m0f);                          // low, cols 8-15
    w[2] = _mm256_and_si256(_mm256_srli_epi16(A, 4), m0f);    // high, 0-7
    w[3] = _mm256_and_si256(_mm256_srli_epi16(B, 4), m0f);    // high, 8-15
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) {
      int32_t xd;
      std::memcpy(&xd, xq + t * P.ldq + 4 * b, 4);
      __m256i xb = _mm256_set1_epi32(xd);
      #pragma GCC unroll 16
      for (int k = 0; k < 4; ++k)
        acc[t][k] = _mm256_add_epi32(
            acc[t][k], _mm256_madd_epi16(_mm256_maddubs_epi16(w[k], xb), ones));
    }
  }
  const float* slo = P.scale + s.group * P.OUT + c;
  #pragma GCC unroll 16
  for (int t = 0; t < TT; ++t) {
    const __m256 st = _mm256_set1_ps(P.sact[(t0 + t) * P.nact + s.act]);
    float* y = P.y + (t0 + t) * P.OUT + c;
    #pragma GCC unroll 16
    for (int k = 0; k < 4; ++k) {
      const int64_t off = (k & 1) * 8 + (k >> 1) * H;
      __m256 sc = _mm256_mul_ps(_mm256_loadu_ps(slo + off), st);
      __m256 yv = _mm256_loadu_ps(y + off);
      _mm256_storeu_ps(y + off, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t][k]), sc, yv));
    }
  }
}

// vpermt2b indices that interleave 4 rows of 32 bytes (two zmm: rows 0, 1
// and rows 2, 3): dword k of the result is byte k of each row, for columns
// 0-15 (kInterleave4[0]) and 16-31 (kInterleave4[1]).
alignas(64) constexpr uint8_t kInterleave4[2][64] = {
#define LQ_I(k) (k), 32 + (k), 64 + (k), 96 + (k)
    {LQ_I(0), LQ_I(1), LQ_I(2), LQ_I(3), LQ_I(4), LQ_I(5), LQ_I(6), LQ_I(7),
     LQ_I(8), LQ_I(9), LQ_I(10), LQ_I(11), LQ_I(12), LQ_I(13), LQ_I(14),
     LQ_I(15)},
    {LQ_I(16), LQ_I(17), LQ_I(18), LQ_I(19), LQ_I(20), LQ_I(21), LQ_I(22),
     LQ_I(23), LQ_I(24), LQ_I(25), LQ_I(26), LQ_I(27), LQ_I(28), LQ_I(29),
     LQ_I(30), LQ_I(31)}};
#undef LQ_I

// One step of 4 rows for A8TileVnni.
template <int NB, int TT>
LQER_VNNI LQER_INLINE void A8StepVnni(__m512i (&acc)[TT][NB][4],
                                      const __mmask32 (&m)[NB],
                                      const uint8_t* r0, const uint8_t* r1,
                                      const uint8_t* r2, const uint8_t* r3,
                                      const int8_t* xq, int64_t ldq,
                                      __m512i idx0, __m512i idx1, __m512i m0f,
                                      __m512i x08) {
  constexpr int kTernAndXor = ((0xf0 & 0xcc) ^ 0xaa);  // (A & B) ^ C
#pragma GCC unroll 4
  for (int b = 0; b < NB; ++b) {
    __m256i a0 = _mm256_maskz_loadu_epi8(m[b], r0 + 32 * b);
    __m256i a1 = _mm256_maskz_loadu_epi8(m[b], r1 + 32 * b);
    __m256i a2 = _mm256_maskz_loadu_epi8(m[b], r2 + 32 * b);
    __m256i a3 = _mm256_maskz_loadu_epi8(m[b], r3 + 32 * b);
    __m512i z01 = _mm512_inserti64x4(_mm512_castsi256_si512(a0), a1, 1);
    __m512i z23 = _mm512_inserti64x4(_mm512_castsi256_si512(a2), a3, 1);
    __m512i v0 = _mm512_permutex2var_epi8(z01, idx0, z23);
    __m512i v1 = _mm512_permutex2var_epi8(z01, idx1, z23);
    __m512i wv[4];
    wv[0] = _mm512_ternarylogic_epi32(v0, m0f, x08, kTernAndXor);
    wv[1] = _mm512_ternarylogic_epi32(v1, m0f, x08, kTernAndXor);
    wv[2] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v0, 4), m0f, x08, kTernAndXor);
    wv[3] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v1, 4), m0f, x08, kTernAndXor);
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) {
      int32_t xd;
      std::memcpy(&xd, xq + t * ldq, 4);
      const __m512i xb = _mm512_set1_epi32(xd);
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k)
        acc[t][b][k] = _mm512_dpbusd_epi32(acc[t][b][k], wv[k], xb);
    }
  }
}

// W4A8 with vpdpbusd: NB blocks of 32 packed columns (64 outputs), TT
// tokens, 4 rows a step. Two rows per zmm (32 bytes each), vpermt2b
// interleaves the 4 rows' bytes per column (dword k = rows i..i+3 of column
// k), a ternary-logic op makes the nibble (q + 8 = nibble ^ 8) and
// vpdpbusd(u8 weights, s8 activations) sums 4 rows per lane. The
// accumulator starts at -8 * sum(xq) over the segment, so it ends exact.
template <int NB, int TT>
LQER_VNNI void A8TileVnni(const Problem& P, int64_t si, int64_t c,
                          int64_t ncols, int64_t t0) {
  const Segment& s = P.seg[si];
  const int64_t H = P.H;
  const __m512i idx0 = _mm512_load_si512(kInterleave4[0]);
  const __m512i idx1 = _mm512_load_si512(kInterleave4[1]);
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  const __m512i x08 = _mm512_set1_epi8(0x08);
  __mmask32 m[NB];
  #pragma GCC unroll 16
  for (int b = 0; b < NB; ++b) {
    int64_t n = ncols - 32 * b;
    m[b] = Mask32(n);
  }
  __m512i acc[TT][NB][4];
  #pragma GCC unroll 16
  for (int t = 0; t < TT; ++t) {
    __m512i init = _mm512_set1_epi32(-8 * P.xsum[(t0 + t) * P.nseg + si]);
    #pragma GCC unroll 16
    for (int b = 0; b < NB; ++b)
      #pragma GCC unroll 16
      for (int k = 0; k < 4; ++k) acc[t][b][k] = init;
  }
  const int64_t rows = s.end - s.begin;
  const int64_t nfull = rows / 4;
  const int8_t* xq = P.xq + t0 * P.ldq + s.begin;
  const int64_t ldq = P.ldq;
  const int64_t pf = P.pf;
  const uint8_t* w = P.packed + s.begin * H + c;
  for (int64_t blk = 0; blk < nfull; ++blk, w += 4 * H) {
    if (pf) {
      #pragma GCC unroll 16
      for (int k = 0; k < 4; ++k)
        _mm_prefetch(reinterpret_cast<const char*>(w + k * H + pf), _MM_HINT_T0);
    }
    A8StepVnni<NB, TT>(acc, m, w, w + H, w + 2 * H, w + 3 * H, xq + 4 * blk,
                       ldq, idx0, idx1, m0f, x08);
  }
  if (rows % 4) {
    const int64_t left = rows % 4;
    const uint8_t* pad = P.pad_row + c;
    A8StepVnni<NB, TT>(acc, m, w, left > 1 ? w + H : pad,
                       left > 2 ? w + 2 * H : pad, pad, xq + 4 * nfull, ldq,
                       idx0, idx1, m0f, x08);
  }
  const float* slo = P.scale + s.group * P.OUT + c;
  #pragma GCC unroll 16
  for (int t = 0; t < TT; ++t) {
    const __m512 st = _mm512_set1_ps(P.sact[(t0 + t) * P.nact + s.act]);
    float* y = P.y + (t0 + t) * P.OUT + c;
    #pragma GCC unroll 16
    for (int b = 0; b < NB; ++b) {
      #pragma GCC unroll 16
      for (int k = 0; k < 4; ++k) {
        const int64_t col = 32 * b + (k & 1) * 16;
        const __mmask16 mk = Mask16(ncols - col);
        const int64_t off = col + (k >> 1) * H;
        __m512 sc = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, slo + off), st);
        __m512 yv = _mm512_maskz_loadu_ps(mk, y + off);
        _mm512_mask_storeu_ps(
            y + off, mk, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t][b][k]), sc, yv));
      }
    }
  }
}

// A8 panel path for many tokens: a (row block x 32 columns) block of the
// weight is interleaved and nibble-split once into an int8 panel in L1 (4
// zmm per 4 rows: low nibbles of columns 0-15, 16-31, high 0-15, 16-31),
// then every token block reuses it: per 4 rows, 4 loads, kPanelTT
// broadcasts and 4 * kPanelTT vpdpbusd.
constexpr int kPanelTT = 6;

LQER_VNNI void A8BuildPanelVnni(const Problem& P, int64_t r0, int64_t r1,
                                int64_t c, int64_t ncols, __m512i* panel) {
  const int64_t H = P.H;
  const __m512i idx0 = _mm512_load_si512(kInterleave4[0]);
  const __m512i idx1 = _mm512_load_si512(kInterleave4[1]);
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  const __m512i x08 = _mm512_set1_epi8(0x08);
  constexpr int kTernAndXor = ((0xf0 & 0xcc) ^ 0xaa);
  const __mmask32 m = Mask32(ncols);
  const uint8_t* pad = P.pad_row + c;
  for (int64_t i = r0, k = 0; i < r1; i += 4, ++k) {
    const uint8_t* r[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j)
      r[j] = i + j < r1 ? P.packed + (i + j) * H + c : pad;
    __m256i a0 = _mm256_maskz_loadu_epi8(m, r[0]);
    __m256i a1 = _mm256_maskz_loadu_epi8(m, r[1]);
    __m256i a2 = _mm256_maskz_loadu_epi8(m, r[2]);
    __m256i a3 = _mm256_maskz_loadu_epi8(m, r[3]);
    __m512i z01 = _mm512_inserti64x4(_mm512_castsi256_si512(a0), a1, 1);
    __m512i z23 = _mm512_inserti64x4(_mm512_castsi256_si512(a2), a3, 1);
    __m512i v0 = _mm512_permutex2var_epi8(z01, idx0, z23);
    __m512i v1 = _mm512_permutex2var_epi8(z01, idx1, z23);
    panel[4 * k + 0] = _mm512_ternarylogic_epi32(v0, m0f, x08, kTernAndXor);
    panel[4 * k + 1] = _mm512_ternarylogic_epi32(v1, m0f, x08, kTernAndXor);
    panel[4 * k + 2] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v0, 4), m0f, x08, kTernAndXor);
    panel[4 * k + 3] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v1, 4), m0f, x08, kTernAndXor);
  }
}

// Segment si (rows from the panel, which starts at row `pr0`), token block
// tb (tokens t0 .. t0 + tt), columns c .. c + ncols.
LQER_VNNI void A8PanelTileVnni(const Problem& P, int64_t si, const __m512i* panel,
                               int64_t pr0, int64_t c, int64_t ncols,
                               int64_t tb, int64_t tt) {
  constexpr int TT = kPanelTT;
  const Segment& s = P.seg[si];
  const int64_t t0 = tb * TT;
  __m512i acc[TT][4];
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t) {
    const int32_t xs = t < tt ? P.xsum[(t0 + t) * P.nseg + si] : 0;
    const __m512i init = _mm512_set1_epi32(-8 * xs);
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) acc[t][k] = init;
  }
  const int64_t step0 = s.begin / 4, nstep = (s.end - s.begin + 3) / 4;
  const __m512i* w = panel + 4 * ((s.begin - pr0) / 4);
  const int32_t* xb = P.xqi + (tb * P.nsteps + step0) * TT;
  for (int64_t k = 0; k < nstep; ++k, w += 4, xb += TT) {
    const __m512i w0 = _mm512_load_si512(w + 0), w1 = _mm512_load_si512(w + 1);
    const __m512i w2 = _mm512_load_si512(w + 2), w3 = _mm512_load_si512(w + 3);
#pragma GCC unroll 16
    for (int t = 0; t < TT; ++t) {
      const __m512i b = _mm512_set1_epi32(xb[t]);
      acc[t][0] = _mm512_dpbusd_epi32(acc[t][0], w0, b);
      acc[t][1] = _mm512_dpbusd_epi32(acc[t][1], w1, b);
      acc[t][2] = _mm512_dpbusd_epi32(acc[t][2], w2, b);
      acc[t][3] = _mm512_dpbusd_epi32(acc[t][3], w3, b);
    }
  }
  const float* slo = P.scale + s.group * P.OUT + c;
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t) {
    if (t >= tt) break;
    const __m512 st = _mm512_set1_ps(P.sact[(t0 + t) * P.nact + s.act]);
    float* y = P.y + (t0 + t) * P.OUT + c;
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      const int64_t col = (k & 1) * 16;
      const __mmask16 mk = Mask16(ncols - col);
      const int64_t off = col + (k >> 1) * P.H;
      __m512 sc = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, slo + off), st);
      __m512 yv = _mm512_maskz_loadu_ps(mk, y + off);
      _mm512_mask_storeu_ps(
          y + off, mk, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t][k]), sc, yv));
    }
  }
}

}  // namespace
}  // namespace lqer
