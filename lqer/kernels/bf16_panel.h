// Part of int4_kernel.cc: the bfloat16 panel path (bf16 x, many tokens,
// AVX-512 BF16).

#pragma once

#include "problem.h"

namespace lqer {
namespace {

// ---------------------------------------------------------------------------
// bfloat16 x, many tokens: a (row block x 32 columns) block of the weight is
// dequantized once into a bf16 panel (q exactly; scales applied per segment
// at the flush), 4 zmm per row pair (dword k = rows i, i+1 of column k: low
// nibbles of columns 0-15, 16-31, high 0-15, 16-31), then every token block
// reuses it with vdpbf16ps (two rows per lane, float32 accumulation).

constexpr int kBf16TT = 6;
constexpr int64_t kBf16MinT = 16;

// Rows r0 .. r1 (r0 even; a row at or past IN reads as zeros), columns c ..
// c + ncols (<= 32) of packed bytes -> panel.
LQER_BF16 void Bf16BuildPanel(const Problem& P, int64_t r0, int64_t r1,
                              int64_t c, int64_t ncols, const uint8_t* zero_row,
                              __m512i* panel) {
  // Word n: the bf16 bit pattern of q(nibble n) = 0..7, -8..-1.
  alignas(64) static const uint16_t kQ[32] = {
      0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
      0xc100, 0xc0e0, 0xc0c0, 0xc0a0, 0xc080, 0xc040, 0xc000, 0xbf80};
  const __m512i idx_lut = _mm512_load_si512(kQ);
  const __m512i m0f = _mm512_set1_epi16(0x0f);
  const __mmask16 mlo = Mask16(ncols), mhi = Mask16(ncols - 16);
  for (int64_t i = r0, p = 0; i < r1; i += 2, ++p) {
    const uint8_t* a = i < P.IN ? P.packed + i * P.H + c : zero_row;
    const uint8_t* b = i + 1 < std::min(r1, P.IN) ? P.packed + (i + 1) * P.H + c
                                                  : zero_row;
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __mmask16 m = h ? mhi : mlo;
      const __m128i ra = _mm_maskz_loadu_epi8(m, a + 16 * h);
      const __m128i rb = _mm_maskz_loadu_epi8(m, b + 16 * h);
      // Words in order (row i col k, row i+1 col k), k = 0..15.
      const __m512i v = _mm512_cvtepu8_epi16(_mm256_set_m128i(
          _mm_unpackhi_epi8(ra, rb), _mm_unpacklo_epi8(ra, rb)));
      const __m512i lo = _mm512_and_si512(v, m0f);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
      _mm512_store_si512(panel + 4 * p + h, _mm512_permutexvar_epi16(lo, idx_lut));
      _mm512_store_si512(panel + 4 * p + 2 + h,
                         _mm512_permutexvar_epi16(hi, idx_lut));
    }
  }
}

// Segment si (rows from the panel, which starts at row `pr0`), token block
// tb (tokens tb * kBf16TT .. + tt), columns c .. c + ncols.
LQER_BF16 void Bf16PanelTile(const Problem& P, int64_t si, const __m512i* panel,
                             int64_t pr0, int64_t c, int64_t ncols, int64_t tb,
                             int64_t tt) {
  constexpr int TT = kBf16TT;
  const Segment& s = P.seg[si];
  __m512 acc[TT][4];
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t)
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) acc[t][k] = _mm512_setzero_ps();
  const int64_t npair = (s.end - s.begin + 1) / 2;
  const __m512i* w = panel + 4 * ((s.begin - pr0) / 2);
  const uint32_t* xb = P.xbi + (tb * P.npairs + s.begin / 2) * TT;
  for (int64_t k = 0; k < npair; ++k, w += 4, xb += TT) {
    const __m512bh w0 = (__m512bh)_mm512_load_si512(w + 0);
    const __m512bh w1 = (__m512bh)_mm512_load_si512(w + 1);
    const __m512bh w2 = (__m512bh)_mm512_load_si512(w + 2);
    const __m512bh w3 = (__m512bh)_mm512_load_si512(w + 3);
#pragma GCC unroll 16
    for (int t = 0; t < TT; ++t) {
      const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(xb[t]));
      acc[t][0] = _mm512_dpbf16_ps(acc[t][0], w0, b);
      acc[t][1] = _mm512_dpbf16_ps(acc[t][1], w1, b);
      acc[t][2] = _mm512_dpbf16_ps(acc[t][2], w2, b);
      acc[t][3] = _mm512_dpbf16_ps(acc[t][3], w3, b);
    }
  }
  const float* slo = P.scale + s.group * P.OUT + c;
  const int64_t t0 = tb * TT;
#pragma GCC unroll 16
  for (int t = 0; t < TT; ++t) {
    if (t >= tt) break;
    float* y = P.y + (t0 + t) * P.OUT + c;
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      const int64_t col = (k & 1) * 16;
      const __mmask16 mk = Mask16(ncols - col);
      const int64_t off = col + (k >> 1) * P.H;
      const __m512 sc = _mm512_maskz_loadu_ps(mk, slo + off);
      const __m512 yv = _mm512_maskz_loadu_ps(mk, y + off);
      _mm512_mask_storeu_ps(y + off, mk, _mm512_fmadd_ps(acc[t][k], sc, yv));
    }
  }
}

}  // namespace
}  // namespace lqer
