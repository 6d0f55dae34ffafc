// Part of int4_kernel.cc: the low-rank branch, y = (x A) B, in float32
// and, next to the bf16 panel path, in bfloat16.

#pragma once

#include "problem.h"

namespace lqer {
namespace {

// ---------------------------------------------------------------------------
// Branch: y[t, cols] = sum_r xa[t, r] * b[r, cols] (or 0), vectorized over
// columns by the compiler (instantiated per ISA below).

template <int D>
LQER_INLINE void InitYBody(const Problem& P, int64_t c0, int64_t c1) {
  constexpr int64_t kChunk = 512;
  #pragma GCC unroll 16
  for (int h = 0; h < 2; ++h) {
    const int64_t base = h * P.H;
    for (int64_t cc = c0; cc < c1; cc += kChunk) {
      const int64_t ce = std::min(c1, cc + kChunk);
      for (int64_t t = 0; t < P.T; ++t) {
        float* __restrict y = P.y + t * P.OUT + base;
        for (int64_t j = cc; j < ce; ++j) y[j] = 0.f;
        for (int64_t r = 0; r < P.R; ++r) {
          const float coef = P.xa[t * P.R + r];
          const int64_t off = r * P.OUT + base;
          for (int64_t j = cc; j < ce; ++j) y[j] += coef * LoadAs<D>(P.b, off + j);
        }
      }
    }
  }
}

template <int D> void InitYScalar(const Problem& P, int64_t c0, int64_t c1) { InitYBody<D>(P, c0, c1); }
template <int D> LQER_AVX2 void InitYAvx2(const Problem& P, int64_t c0, int64_t c1) { InitYBody<D>(P, c0, c1); }

template <int D> LQER_AVX512 void InitYAvx512(const Problem& P, int64_t c0, int64_t c1);

void InitY(const Problem& P, int64_t c0, int64_t c1) {
  const int d = P.R ? P.b_dtype : kF32;
  if (P.isa >= kAvx512) {
    if (d == kF32) InitYAvx512<kF32>(P, c0, c1);
    else if (d == kBF16) InitYAvx512<kBF16>(P, c0, c1);
    else InitYAvx512<kS8>(P, c0, c1);
  } else if (P.isa == kAvx2) {
    if (d == kF32) InitYAvx2<kF32>(P, c0, c1);
    else if (d == kBF16) InitYAvx2<kBF16>(P, c0, c1);
    else InitYAvx2<kS8>(P, c0, c1);
  } else {
    if (d == kF32) InitYScalar<kF32>(P, c0, c1);
    else if (d == kBF16) InitYScalar<kBF16>(P, c0, c1);
    else InitYScalar<kS8>(P, c0, c1);
  }
}

// xa[t, :] = (xb[t, :] @ a) * a_scale * b_scale for tokens [t0, t1).
// XD: dtype of xb's source (f32 / bf16), AD: a's dtype.
struct BranchIn {
  const void* xb;  // (T, IN), f32 or bf16
  int xb_dtype;
  int64_t ldxb;
  const void* a;  // (IN, R)
  int a_dtype;
  const float* a_scale;  // (R) or null
  const float* b_scale;  // (R) or null
  float* xa;             // (T, R)
  int64_t IN, R;
  int64_t i0, i1;  // rows of a summed: [i0, i1) (a part, when split)
  const float* row_scale;  // (IN) or null: the branch reads xb[t, i] * rs[i]
};

template <int XD, int AD>
LQER_INLINE void BranchXaBody(const BranchIn& B, int64_t t0, int64_t t1) {
  const int64_t R = B.R;
  for (int64_t t = t0; t < t1; ++t) {
    float* __restrict acc = B.xa + t * R;
    for (int64_t r = 0; r < R; ++r) acc[r] = 0.f;
    for (int64_t i = B.i0; i < B.i1; ++i) {
      float xv = LoadAs<XD>(B.xb, t * B.ldxb + i);
      if (B.row_scale) xv *= B.row_scale[i];
      for (int64_t r = 0; r < R; ++r) acc[r] += xv * LoadAs<AD>(B.a, i * R + r);
    }
    for (int64_t r = 0; r < R; ++r) {
      if (B.a_scale) acc[r] *= B.a_scale[r];
      if (B.b_scale) acc[r] *= B.b_scale[r];
    }
  }
}

template <int XD, int AD> void BranchXaScalar(const BranchIn& B, int64_t t0, int64_t t1) { BranchXaBody<XD, AD>(B, t0, t1); }
template <int XD, int AD> LQER_AVX2 void BranchXaAvx2(const BranchIn& B, int64_t t0, int64_t t1) { BranchXaBody<XD, AD>(B, t0, t1); }

// 16 elements of a row of a (f32 / bf16 / int8) as floats, masked.
template <int AD>
LQER_AVX512 LQER_INLINE __m512 LoadA16(const void* a, int64_t off, __mmask16 m) {
  if constexpr (AD == kF32) {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(a) + off);
  } else if constexpr (AD == kBF16) {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(a) + off);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    const __m128i q = _mm_maskz_loadu_epi8(m, static_cast<const int8_t*>(a) + off);
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
  }
}

// xa for TT tokens from t0 and rank columns r0 .. r0 + nr (nr <= 16 NR),
// all in registers: per row i, NR loads of a's row and TT broadcasts of x.
// The sum runs over i in order, as the scalar body's does.
template <int XD, int AD, int TT, int NR>
LQER_AVX512 void BranchXaTileAvx512(const BranchIn& B, int64_t t0, int64_t r0,
                                    int64_t nr) {
  __m512 acc[TT][NR];
  __mmask16 m[NR];
#pragma GCC unroll 4
  for (int k = 0; k < NR; ++k) {
    m[k] = Mask16(nr - 16 * k);
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) acc[t][k] = _mm512_setzero_ps();
  }
  for (int64_t i = B.i0; i < B.i1; ++i) {
    __m512 av[NR];
#pragma GCC unroll 4
    for (int k = 0; k < NR; ++k) av[k] = LoadA16<AD>(B.a, i * B.R + r0 + 16 * k, m[k]);
    const float rs = B.row_scale ? B.row_scale[i] : 1.f;
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) {
      const __m512 xv = _mm512_set1_ps(LoadAs<XD>(B.xb, (t0 + t) * B.ldxb + i) * rs);
#pragma GCC unroll 4
      for (int k = 0; k < NR; ++k) acc[t][k] = _mm512_fmadd_ps(xv, av[k], acc[t][k]);
    }
  }
#pragma GCC unroll 4
  for (int k = 0; k < NR; ++k) {
    const int64_t r = r0 + 16 * k;
    const __m512 sa = B.a_scale ? _mm512_maskz_loadu_ps(m[k], B.a_scale + r) : _mm512_set1_ps(1.f);
    const __m512 sb = B.b_scale ? _mm512_maskz_loadu_ps(m[k], B.b_scale + r) : _mm512_set1_ps(1.f);
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t)
      _mm512_mask_storeu_ps(B.xa + (t0 + t) * B.R + r, m[k],
                            _mm512_mul_ps(_mm512_mul_ps(acc[t][k], sa), sb));
  }
}

// y[t, col .. col + n] = xa[t, :] @ b[:, col ..] for TT tokens from t0 and
// n <= 64 columns, in registers: per rank component, 4 loads of b's row and
// TT broadcasts of xa (the sum over r in order, as InitYBody's).
template <int BD, int TT>
LQER_AVX512 void InitYTileAvx512(const Problem& P, int64_t col, int64_t n,
                                 int64_t t0) {
  __m512 acc[TT][4];
  __mmask16 m[4];
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {
    m[k] = Mask16(n - 16 * k);
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) acc[t][k] = _mm512_setzero_ps();
  }
  for (int64_t r = 0; r < P.R; ++r) {
    __m512 bv[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) bv[k] = LoadA16<BD>(P.b, r * P.OUT + col + 16 * k, m[k]);
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) {
      const __m512 xv = _mm512_set1_ps(P.xa[(t0 + t) * P.R + r]);
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) acc[t][k] = _mm512_fmadd_ps(xv, bv[k], acc[t][k]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < TT; ++t)
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k)
      _mm512_mask_storeu_ps(P.y + (t0 + t) * P.OUT + col + 16 * k, m[k], acc[t][k]);
}

// tile(col, n, t, tt) over the tiles of y that packed columns [c0, c1)
// give, in both halves: 64 columns (n <= 64) by 6 tokens (tt, a
// std::integral_constant), the last tokens one at a time.
template <class Tile>
LQER_INLINE void ForEachYTile(const Problem& P, int64_t c0, int64_t c1,
                              Tile tile) {
  constexpr int TT = 6;
  for (int h = 0; h < 2; ++h) {
    const int64_t e = h * P.H + c1;
    for (int64_t col = h * P.H + c0; col < e; col += 64) {
      const int64_t n = std::min<int64_t>(64, e - col);
      int64_t t = 0;
      for (; t + TT <= P.T; t += TT) tile(col, n, t, std::integral_constant<int, TT>{});
      for (; t < P.T; ++t) tile(col, n, t, std::integral_constant<int, 1>{});
    }
  }
}

// InitY on AVX-512: packed columns [c0, c1) of both halves.
template <int D>
LQER_AVX512 void InitYAvx512(const Problem& P, int64_t c0, int64_t c1) {
  if (P.R == 0) {
    for (int64_t t = 0; t < P.T; ++t)
      for (int h = 0; h < 2; ++h)
        std::memset(P.y + t * P.OUT + h * P.H + c0, 0, (c1 - c0) * sizeof(float));
    return;
  }
  ForEachYTile(P, c0, c1, [&](int64_t col, int64_t n, int64_t t, auto tt) {
    InitYTileAvx512<D, decltype(tt)::value>(P, col, n, t);
  });
}

template <int XD, int AD, int NR>
LQER_AVX512 void BranchXaRanksAvx512(const BranchIn& B, int64_t t0, int64_t t1,
                                     int64_t r0, int64_t nr) {
  constexpr int TT = NR <= 2 ? 8 : 6;
  int64_t t = t0;
  for (; t + TT <= t1; t += TT) BranchXaTileAvx512<XD, AD, TT, NR>(B, t, r0, nr);
  for (; t < t1; ++t) BranchXaTileAvx512<XD, AD, 1, NR>(B, t, r0, nr);
}

template <int XD, int AD>
LQER_AVX512 void BranchXaAvx512(const BranchIn& B, int64_t t0, int64_t t1) {
  for (int64_t r0 = 0; r0 < B.R; r0 += 64) {
    const int64_t nr = std::min<int64_t>(64, B.R - r0);
    if (nr <= 16) BranchXaRanksAvx512<XD, AD, 1>(B, t0, t1, r0, nr);
    else if (nr <= 32) BranchXaRanksAvx512<XD, AD, 2>(B, t0, t1, r0, nr);
    else BranchXaRanksAvx512<XD, AD, 4>(B, t0, t1, r0, nr);
  }
}

template <int XD>
void BranchXaX(int isa, const BranchIn& B, int64_t t0, int64_t t1) {
  switch (isa >= kAvx512 ? 2 : isa) {
    case 2:
      if (B.a_dtype == kF32) return BranchXaAvx512<XD, kF32>(B, t0, t1);
      if (B.a_dtype == kBF16) return BranchXaAvx512<XD, kBF16>(B, t0, t1);
      return BranchXaAvx512<XD, kS8>(B, t0, t1);
    case 1:
      if (B.a_dtype == kF32) return BranchXaAvx2<XD, kF32>(B, t0, t1);
      if (B.a_dtype == kBF16) return BranchXaAvx2<XD, kBF16>(B, t0, t1);
      return BranchXaAvx2<XD, kS8>(B, t0, t1);
    default:
      if (B.a_dtype == kF32) return BranchXaScalar<XD, kF32>(B, t0, t1);
      if (B.a_dtype == kBF16) return BranchXaScalar<XD, kBF16>(B, t0, t1);
      return BranchXaScalar<XD, kS8>(B, t0, t1);
  }
}

void BranchXa(int isa, const BranchIn& B, int64_t t0, int64_t t1) {
  if (B.xb_dtype == kF32) BranchXaX<kF32>(isa, B, t0, t1);
  else BranchXaX<kBF16>(isa, B, t0, t1);
}

// ---------------------------------------------------------------------------
// Branch in bfloat16 (the bf16 panel path's calls with bf16 factors and the
// branch reading bf16 x): x A with vdpbf16ps on the exact bf16 products
// (float32 sums), then xa rounded to bf16 (nearest even) and xa B with
// vdpbf16ps: two rank components per float32 lane, half the f32 FMAs.
// Pairs of rows of A (of B) are interleaved on the fly by vpunpck{l,h}wd,
// which leaves lane l of the "lo" / "hi" result holding rank (column)
// 8 (l / 4) + l % 4 / + 4; kUnpermute{0,1} put 16 of them back in order.

alignas(64) constexpr int32_t kUnpermute[2][16] = {
    {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23},
    {8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31}};

// Lanes in order from the lo / hi accumulators of 32 interleaved columns:
// columns 0-15 (half 0) or 16-31 (half 1).
LQER_BF16 LQER_INLINE __m512 Unpermute(__m512 lo, __m512 hi, int half) {
  return _mm512_permutex2var_ps(lo, _mm512_load_si512(kUnpermute[half]), hi);
}

// x[t, i] and x[t, i + 1] (bf16, the second 0 past IN) as one dword.
LQER_INLINE uint32_t XPair(const uint16_t* x, int64_t i, int64_t in) {
  return x[i] | (i + 1 < in ? static_cast<uint32_t>(x[i + 1]) << 16 : 0u);
}

// xa for TT tokens from t0 and rank columns r0 .. r0 + nr (nr <= 32).
template <int TT>
LQER_BF16 void BranchXaTileBf16(const BranchIn& B, int64_t t0, int64_t r0,
                                int64_t nr) {
  const uint16_t* x = static_cast<const uint16_t*>(B.xb);
  const uint16_t* a = static_cast<const uint16_t*>(B.a) + r0;
  const __mmask32 m = Mask32(nr);
  __m512 lo[TT], hi[TT];
#pragma GCC unroll 8
  for (int t = 0; t < TT; ++t) lo[t] = hi[t] = _mm512_setzero_ps();
  for (int64_t i = B.i0; i < B.i1; i += 2) {
    const __m512i ra = _mm512_maskz_loadu_epi16(m, a + i * B.R);
    const __m512i rb = i + 1 < B.i1 ? _mm512_maskz_loadu_epi16(m, a + (i + 1) * B.R)
                                    : _mm512_setzero_si512();
    const __m512bh wl = (__m512bh)_mm512_unpacklo_epi16(ra, rb);
    const __m512bh wh = (__m512bh)_mm512_unpackhi_epi16(ra, rb);
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) {
      const uint32_t xp = XPair(x + (t0 + t) * B.ldxb, i, B.i1);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp));
      lo[t] = _mm512_dpbf16_ps(lo[t], wl, xv);
      hi[t] = _mm512_dpbf16_ps(hi[t], wh, xv);
    }
  }
#pragma GCC unroll 2
  for (int half = 0; half < 2; ++half) {
    const int64_t r = r0 + 16 * half;
    const __mmask16 mk = Mask16(nr - 16 * half);
    if (!mk) break;
    const __m512 sa = B.a_scale ? _mm512_maskz_loadu_ps(mk, B.a_scale + r) : _mm512_set1_ps(1.f);
    const __m512 sb = B.b_scale ? _mm512_maskz_loadu_ps(mk, B.b_scale + r) : _mm512_set1_ps(1.f);
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t)
      _mm512_mask_storeu_ps(B.xa + (t0 + t) * B.R + r, mk,
                            _mm512_mul_ps(_mm512_mul_ps(Unpermute(lo[t], hi[t], half), sa), sb));
  }
}

LQER_BF16 void BranchXaBf16(const BranchIn& B, int64_t t0, int64_t t1) {
  constexpr int TT = 8;
  for (int64_t r0 = 0; r0 < B.R; r0 += 32) {
    const int64_t nr = std::min<int64_t>(32, B.R - r0);
    int64_t t = t0;
    for (; t + TT <= t1; t += TT) BranchXaTileBf16<TT>(B, t, r0, nr);
    for (; t < t1; ++t) BranchXaTileBf16<1>(B, t, r0, nr);
  }
}

// y[t, col .. col + n] = xab[t, :] @ b[:, col ..] for TT tokens from t0 and
// n <= 64 columns; xab: (T, R / 2 rounded up) dwords of bf16 xa pairs.
template <int TT>
LQER_BF16 void InitYTileBf16(const Problem& P, int64_t col, int64_t n,
                             int64_t t0) {
  const uint16_t* b = static_cast<const uint16_t*>(P.b) + col;
  const int64_t np = (P.R + 1) / 2;
  const __mmask32 m0 = Mask32(n), m1 = Mask32(n - 32);
  __m512 acc[TT][4];
#pragma GCC unroll 8
  for (int t = 0; t < TT; ++t)
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) acc[t][k] = _mm512_setzero_ps();
  for (int64_t q = 0; q < np; ++q) {
    const uint16_t* r0 = b + 2 * q * P.OUT;
    const bool two = 2 * q + 1 < P.R;
    const __m512i a0 = _mm512_maskz_loadu_epi16(m0, r0);
    const __m512i a1 = _mm512_maskz_loadu_epi16(m1, r0 + 32);
    const __m512i b0 = two ? _mm512_maskz_loadu_epi16(m0, r0 + P.OUT) : _mm512_setzero_si512();
    const __m512i b1 = two ? _mm512_maskz_loadu_epi16(m1, r0 + P.OUT + 32) : _mm512_setzero_si512();
    const __m512bh w[4] = {(__m512bh)_mm512_unpacklo_epi16(a0, b0),
                           (__m512bh)_mm512_unpackhi_epi16(a0, b0),
                           (__m512bh)_mm512_unpacklo_epi16(a1, b1),
                           (__m512bh)_mm512_unpackhi_epi16(a1, b1)};
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(P.xab[(t0 + t) * np + q]));
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) acc[t][k] = _mm512_dpbf16_ps(acc[t][k], w[k], xv);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < TT; ++t) {
    float* y = P.y + (t0 + t) * P.OUT + col;
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k)
      _mm512_mask_storeu_ps(y + 16 * k, Mask16(n - 16 * k),
                            Unpermute(acc[t][k & 2], acc[t][(k & 2) + 1], k & 1));
  }
}

LQER_BF16 void InitYBf16(const Problem& P, int64_t c0, int64_t c1) {
  ForEachYTile(P, c0, c1, [&](int64_t col, int64_t n, int64_t t, auto tt) {
    InitYTileBf16<decltype(tt)::value>(P, col, n, t);
  });
}

// xab[t, k] = bf16(xa[t, 2k]) | bf16(xa[t, 2k + 1]) << 16 (0 past R).
void PackXaBf16(const float* xa, int64_t T, int64_t R, uint32_t* xab) {
  const int64_t np = (R + 1) / 2;
  auto bits = [](float f) { return Bf16Bits(RoundBf16(f)); };
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < np; ++k) {
      const int64_t r = 2 * k;
      const uint32_t hi = r + 1 < R ? bits(xa[t * R + r + 1]) : 0u;
      xab[t * np + k] = bits(xa[t * R + r]) | (hi << 16);
    }
}

}  // namespace
}  // namespace lqer
