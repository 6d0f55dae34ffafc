// Part of int4_kernel.cc: the activation prologue (x / lam, and Qwix's
// dynamic int8 quantization per token).

#pragma once

#include "problem.h"

namespace lqer {
namespace {

// ---------------------------------------------------------------------------
// Activation prologue.
//
// xs = x / lam as XLA:CPU computes lqer's `x / lam.astype(x.dtype)`: x times
// the float32 reciprocal of lam (lam rounded to bfloat16 first for bfloat16
// x), rounded to bfloat16 for bfloat16 x.
//
// Qwix's dynamic int8 (absmax calibration, qmax = 127.5), as XLA:CPU
// compiles it (division by a constant and by a broadcast scale become
// multiplications by reciprocals):
//   s = absmax(xs) * float(1 / 127.5)   [rounded to bf16 for bf16 x]
//   s = 1 if s < sqrt(FLT_MIN)
//   q = sat_s8(round_half_even(xs * (1 / s)))  [product rounded to bf16
//                                              first for bf16 x]

struct Prologue {
  const void* x;
  bool x_bf16;
  int64_t T, IN;
  const float* inv_lam;  // (IN) or null
  float* xs;             // (T, IN) output or null (float path)
  // A8
  int8_t* xq;
  int64_t ldq;
  int32_t* xsum;
  float* sact;
  int64_t act_rows, nact;
  const Segment* seg;
  int64_t nseg;
  std::vector<float>* scratch;  // per task, IN floats
};

LQER_INLINE float XsAt(const Prologue& Q, int64_t t, int64_t i) {
  float v = Q.x_bf16
                ? Bf16ToF32(static_cast<const uint16_t*>(Q.x)[t * Q.IN + i])
                : static_cast<const float*>(Q.x)[t * Q.IN + i];
  if (Q.inv_lam) {
    v = v * Q.inv_lam[i];
    if (Q.x_bf16) v = RoundBf16(v);
  }
  return v;
}

void PrologueTokens(const Prologue& Q, int64_t t0, int64_t t1, float* tmp) {
  const float kInvQmax = 1.0f / 127.5f;  // 0.00784313772f, as XLA folds it
  const float kTinySqrt = 1.08420217e-19f;  // sqrt(FLT_MIN) = 2^-63
  for (int64_t t = t0; t < t1; ++t) {
    float* xs = Q.xs ? Q.xs + t * Q.IN : tmp;
    for (int64_t i = 0; i < Q.IN; ++i) xs[i] = XsAt(Q, t, i);
    if (!Q.xq) continue;
    int8_t* xq = Q.xq + t * Q.ldq;
    for (int64_t a = 0; a < Q.nact; ++a) {
      const int64_t i0 = a * Q.act_rows, i1 = std::min(Q.IN, i0 + Q.act_rows);
      float am = 0.f;
      for (int64_t i = i0; i < i1; ++i) am = std::max(am, std::fabs(xs[i]));
      float s = am * kInvQmax;
      if (Q.x_bf16) s = RoundBf16(s);
      if (s < kTinySqrt) s = 1.0f;
      const float inv = 1.0f / s;
      for (int64_t i = i0; i < i1; ++i) {
        float v = xs[i] * inv;
        if (Q.x_bf16) v = RoundBf16(v);
        xq[i] = SatS8(RoundEvenSmall(v));
      }
      Q.sact[t * Q.nact + a] = s;
    }
    for (int64_t i = Q.IN; i < Q.ldq; ++i) xq[i] = 0;
    for (int64_t k = 0; k < Q.nseg; ++k) {
      int32_t sum = 0;
      for (int64_t i = Q.seg[k].begin; i < Q.seg[k].end; ++i) sum += xq[i];
      Q.xsum[t * Q.nseg + k] = sum;
    }
  }
}

}  // namespace
}  // namespace lqer
