// CPU matmul of float / int8 activations with lqer's PackedInt4 weights,
// as XLA FFI custom calls.
//
//   y[t, o] = sum_i xm[t, i] * q[i, o] * scale[i / gr, o]
//           + sum_r (xb[t, :] @ A)[r] * B[r, o]
//
// packed: uint8 (IN, H), H = OUT / 2; byte p = packed[i, j] holds
// q[i, j] = (int8(p << 4)) >> 4 (low nibble) and q[i, j + H] = int8(p) >> 4.
// scale: float32 (G, OUT), gr = IN / G consecutive rows share a scale row.
//
// LqerInt4MatmulF32: xm = x / lam (float), accumulated in float32.
// LqerInt4MatmulA8:  xm = Q(x / lam), x quantized to int8 per token (or per
//   token and tile of `act_tile` rows) exactly as Qwix's dynamic int8
//   quantization compiles on XLA:CPU; integer dot products per scale group.
// xb (branch input) = x, or x / lam with lam_in_branch; times row_scale
//   (IN, optional: an input scale s folded out of A, xb s A = xb (s A)).
// bfloat16 x from 16 tokens on (ISA avx512vnni, and AVX-512 BF16 on the CPU):
//   the float path multiplies with vdpbf16ps on a bf16 panel of q (exact),
//   float32 accumulation, scales applied per segment.
//
// The instruction set is picked at run time (cpuid; env LQER_ISA =
// scalar | avx2 | avx512 | avx512vnni caps it, read at every call). Nothing
// here is compiled with -march: every SIMD function carries its own
// __attribute__((target(...))).
//
// The parts, in the order they build on each other: cpu.h, pool.h,
// problem.h, float_tiles.h, a8_tiles.h, bf16_panel.h, dispatch.h, branch.h,
// prologue.h; this file holds the call and its XLA FFI binding.

#include "a8_tiles.h"
#include "bf16_panel.h"
#include "branch.h"
#include "cpu.h"
#include "dispatch.h"
#include "float_tiles.h"
#include "pool.h"
#include "problem.h"
#include "prologue.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace lqer {
namespace {

// The call.

struct Scratch {
  std::vector<float> xs, xa, xa_parts, sact, inv_lam;
  std::vector<int8_t> xq;
  std::vector<int32_t> xsum, xqi;
  std::vector<uint32_t> xbi, xab;
  std::vector<uint8_t> pad;
  std::vector<Segment> seg;
  std::vector<int64_t> block_seg;
  std::vector<std::vector<float>> tmp;
};

thread_local Scratch tls_scratch;

int DtypeCode(ffi::DataType d) {
  switch (d) {
    case ffi::DataType::F32: return kF32;
    case ffi::DataType::BF16: return kBF16;
    case ffi::DataType::S8: return kS8;
    default: return -1;
  }
}

std::string Dims(const ffi::AnyBuffer& b) {
  std::string s = "(";
  auto d = b.dimensions();
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + ")";
}

ffi::Error Matmul(bool a8, ffi::AnyBuffer x, ffi::AnyBuffer packed,
                  ffi::AnyBuffer scale, ffi::AnyBuffer a, ffi::AnyBuffer b,
                  ffi::AnyBuffer a_scale, ffi::AnyBuffer b_scale,
                  ffi::AnyBuffer lam, ffi::AnyBuffer row_scale,
                  int32_t lam_in_branch, int32_t act_tile,
                  ffi::Result<ffi::AnyBuffer> y) {
  using E = ffi::Error;
  // ---- shapes
  if (packed.element_type() != ffi::DataType::U8 || packed.dimensions().size() != 2)
    return E::InvalidArgument("packed must be uint8 (IN, OUT/2), got " + Dims(packed));
  const int64_t IN = packed.dimensions()[0], H = packed.dimensions()[1];
  const int64_t OUT = 2 * H;
  if (x.dimensions().size() != 2 || x.dimensions()[1] != IN)
    return E::InvalidArgument("x must be (T, IN=" + std::to_string(IN) + "), got " + Dims(x));
  const bool x_bf16 = x.element_type() == ffi::DataType::BF16;
  if (!x_bf16 && x.element_type() != ffi::DataType::F32)
    return E::InvalidArgument("x must be float32 or bfloat16");
  const int64_t T = x.dimensions()[0];
  if (scale.element_type() != ffi::DataType::F32 || scale.dimensions().size() != 2 ||
      scale.dimensions()[1] != OUT)
    return E::InvalidArgument("scale must be float32 (G, OUT=" + std::to_string(OUT) + "), got " + Dims(scale));
  const int64_t G = scale.dimensions()[0];
  if (G < 1 || IN % G)
    return E::InvalidArgument("scale groups must divide IN, got G=" + std::to_string(G));
  const int64_t gr = IN / G;
  if (a.dimensions().size() != 2 || a.dimensions()[0] != IN)
    return E::InvalidArgument("a must be (IN, R), got " + Dims(a));
  const int64_t R = a.dimensions()[1];
  if (b.dimensions().size() != 2 || b.dimensions()[0] != R || b.dimensions()[1] != OUT)
    return E::InvalidArgument("b must be (R, OUT), got " + Dims(b));
  const int a_dt = DtypeCode(a.element_type()), b_dt = DtypeCode(b.element_type());
  if (R > 0 && (a_dt < 0 || b_dt < 0))
    return E::InvalidArgument("a, b must be float32, bfloat16 or int8");
  // Per-rank-component scales: a_f[i, r] = a[i, r] * a_scale[r], b_f[r, o]
  // = b[r, o] * b_scale[r]; required for int8 factors, optional otherwise.
  const float* as = nullptr;
  const float* bs = nullptr;
  if (R > 0) {
    if (a_scale.element_count() > 0) {
      if (a_scale.element_type() != ffi::DataType::F32 || (int64_t)a_scale.element_count() != R)
        return E::InvalidArgument("a_scale must be float32 (R,), got " + Dims(a_scale));
      as = static_cast<const float*>(a_scale.untyped_data());
    } else if (a_dt == kS8) {
      return E::InvalidArgument("int8 a needs a_scale (R,)");
    }
    if (b_scale.element_count() > 0) {
      if (b_scale.element_type() != ffi::DataType::F32 || (int64_t)b_scale.element_count() != R)
        return E::InvalidArgument("b_scale must be float32 (R,), got " + Dims(b_scale));
      bs = static_cast<const float*>(b_scale.untyped_data());
    } else if (b_dt == kS8) {
      return E::InvalidArgument("int8 b needs b_scale (R,)");
    }
  }
  const bool has_lam = lam.element_count() > 0;
  const bool has_rs = R > 0 && row_scale.element_count() > 0;
  if (has_rs && (row_scale.element_type() != ffi::DataType::F32 ||
                 (int64_t)row_scale.element_count() != IN))
    return E::InvalidArgument("row_scale must be float32 (IN,), got " + Dims(row_scale));
  if (has_lam && (lam.element_type() != ffi::DataType::F32 || (int64_t)lam.element_count() != IN))
    return E::InvalidArgument("lam must be float32 (IN,)");
  if (y->element_type() != ffi::DataType::F32 ||
      (int64_t)y->element_count() != T * OUT)
    return E::InvalidArgument("y must be float32 (T, OUT)");
  int64_t act_rows = IN;
  if (a8 && act_tile > 0) {
    if (IN % act_tile)
      return E::InvalidArgument("act_tile must divide IN");
    act_rows = act_tile;
  }
  if (T == 0 || OUT == 0) return E::Success();

  // ---- setup
  Scratch& S = tls_scratch;
  Problem P;
  P.T = T; P.IN = IN; P.H = H; P.OUT = OUT; P.G = G; P.R = R;
  P.packed = static_cast<const uint8_t*>(packed.untyped_data());
  P.scale = static_cast<const float*>(scale.untyped_data());
  P.y = static_cast<float*>(y->untyped_data());
  P.isa = CurrentIsa();
  P.a8 = a8;
  const int nthreads = NumThreads();
  Pool& pool = GetPool();

  // bf16 panel path: bfloat16 x, many tokens, AVX-512 BF16, scale groups
  // starting at even rows.
  const bool use_bf16 = !a8 && x_bf16 && P.isa == kAvx512Vnni &&
                        HardwareBf16() &&
                        T >= EnvInt("LQER_BF16_MIN_T", kBf16MinT) &&
                        (G == 1 || gr % 2 == 0);
  // Row blocks (tile loop order: row block, column tile, token block).
  int64_t rb = use_bf16 ? EnvInt("LQER_BF16_RB", 256)
                        : EnvInt(T == 1 ? "LQER_RB1" : "LQER_RB", T == 1 ? 32 : 512);
  rb = std::max<int64_t>(4, rb / 4 * 4);
  P.pf = EnvInt(T == 1 ? "LQER_PF1" : "LQER_PF", T == 1 ? 512 : 0);
  if (P.isa == kScalar) P.pf = 0;
  P.f32_mode = static_cast<int>(std::clamp<int64_t>(EnvInt("LQER_F32MODE", 4), 0, 4));

  // Segments.
  S.seg.clear();
  S.block_seg.clear();
  {
    int64_t i = 0, last_block = -1;
    while (i < IN) {
      int64_t e = std::min({IN, (i / gr + 1) * gr, (i / act_rows + 1) * act_rows,
                            (i / rb + 1) * rb});
      int64_t blk = i / rb;
      if (blk != last_block) {
        S.block_seg.push_back(static_cast<int64_t>(S.seg.size()));
        last_block = blk;
      }
      S.seg.push_back(Segment{i, e, i / gr, i / act_rows});
      i = e;
    }
    S.block_seg.push_back(static_cast<int64_t>(S.seg.size()));
  }
  P.seg = S.seg.data();
  P.nseg = static_cast<int64_t>(S.seg.size());
  P.block_seg = S.block_seg.data();
  P.nblocks = static_cast<int64_t>(S.block_seg.size()) - 1;

  // lam reciprocals.
  const float* inv_lam = nullptr;
  if (has_lam) {
    const float* l = static_cast<const float*>(lam.untyped_data());
    S.inv_lam.resize(IN);
    for (int64_t i = 0; i < IN; ++i)
      S.inv_lam[i] = 1.0f / (x_bf16 ? RoundBf16(l[i]) : l[i]);
    inv_lam = S.inv_lam.data();
  }

  // Prologue: xs (float path, when x is bf16 or lam is given), xq etc.
  Prologue Q{};
  Q.x = x.untyped_data();
  Q.x_bf16 = x_bf16;
  Q.T = T; Q.IN = IN;
  Q.inv_lam = inv_lam;
  const bool need_xs = (!a8 && (x_bf16 || has_lam)) ||
                       (R > 0 && lam_in_branch && (x_bf16 || has_lam));
  if (need_xs) {
    S.xs.resize(T * IN);
    Q.xs = S.xs.data();
  }
  if (a8) {
    Q.ldq = (IN + 3) / 4 * 4 + 4;
    S.xq.resize(T * Q.ldq);
    S.xsum.resize(T * P.nseg);
    Q.act_rows = act_rows;
    Q.nact = (IN + act_rows - 1) / act_rows;
    S.sact.resize(T * Q.nact);
    Q.xq = S.xq.data(); Q.xsum = S.xsum.data(); Q.sact = S.sact.data();
    Q.seg = P.seg; Q.nseg = P.nseg;
    S.pad.assign(H + 64, 0x88);
    P.xq = Q.xq; P.ldq = Q.ldq; P.xsum = Q.xsum; P.sact = Q.sact;
    P.nact = Q.nact; P.pad_row = S.pad.data();
  }
  // Branch input.
  BranchIn B{};
  if (R > 0) {
    if (lam_in_branch && (x_bf16 || has_lam)) {
      B.xb = Q.xs; B.xb_dtype = kF32;
    } else {
      B.xb = x.untyped_data(); B.xb_dtype = x_bf16 ? kBF16 : kF32;
    }
    B.ldxb = IN;
    B.a = a.untyped_data(); B.a_dtype = a_dt;
    B.a_scale = as; B.b_scale = bs;
    S.xa.resize(T * R);
    B.xa = S.xa.data();
    B.IN = IN; B.R = R;
    B.i0 = 0; B.i1 = IN;
    B.row_scale = has_rs ? static_cast<const float*>(row_scale.untyped_data()) : nullptr;
    P.xa = B.xa; P.b = b.untyped_data(); P.b_dtype = b_dt;
  }
  const bool need_prologue = need_xs || a8;
  // Few tokens and a large a: x @ a split over a's rows in kSplitXa parts
  // run on the pool, the partial sums added in order (one thread alone
  // reads a at a fraction of the bandwidth both reach). The split depends
  // on the shape only, so the thread count never changes a bit.
  constexpr int64_t kSplitXa = 4;
  const bool split_branch = R > 0 && T < kSplitXa &&
                            IN * R >= EnvInt("LQER_SPLIT_XA", 1 << 16);
  // The branch in bf16 where the main product is (bf16 panel path) and it
  // reads the same bf16 x with bf16 factors (BranchXaBf16, InitYBf16).
  const bool bf16_branch = use_bf16 && R > 0 && !split_branch &&
                           B.xb_dtype == kBF16 && !B.row_scale &&
                           a_dt == kBF16 && b_dt == kBF16 &&
                           EnvInt("LQER_BF16_BRANCH", 1) != 0;
  {
    // Parallel over tokens: tasks of >= 1 token, ~4 per thread.
    const int64_t ntask = std::min<int64_t>(T, 4 * nthreads);
    if (static_cast<int64_t>(S.tmp.size()) < ntask) S.tmp.resize(ntask);
    for (int64_t k = 0; k < ntask; ++k) S.tmp[k].resize(IN);
    auto task = [&](int k) {
      const int64_t t0 = T * k / ntask, t1 = T * (k + 1) / ntask;
      if (need_prologue) PrologueTokens(Q, t0, t1, S.tmp[k].data());
      if (R > 0 && !split_branch) {
        if (bf16_branch) BranchXaBf16(B, t0, t1);
        else BranchXa(P.isa, B, t0, t1);
      }
    };
    if (need_prologue || (R > 0 && !split_branch)) {
      if (T * IN * (1 + R / 8) < (1 << 16)) {
        for (int64_t k = 0; k < ntask; ++k) task(static_cast<int>(k));
      } else {
        pool.Run(static_cast<int>(ntask), nthreads, task);
      }
    }
  }
  if (split_branch) {
    const int64_t nsplit = kSplitXa;
    S.xa_parts.resize(static_cast<size_t>(nsplit * T * R));  // each part writes all of its T x R
    pool.Run(static_cast<int>(nsplit), nthreads, [&](int k) {
      BranchIn part = B;
      part.i0 = IN * k / nsplit;
      part.i1 = IN * (k + 1) / nsplit;
      part.xa = S.xa_parts.data() + k * T * R;
      BranchXa(P.isa, part, 0, T);
    });
    for (int64_t j = 0; j < T * R; ++j) {
      float sum = 0.f;
      for (int64_t k = 0; k < nsplit; ++k) sum += S.xa_parts[k * T * R + j];
      B.xa[j] = sum;
    }
  }
  if (bf16_branch) {
    S.xab.resize(static_cast<size_t>(T * ((R + 1) / 2)));
    PackXaBf16(B.xa, T, R, S.xab.data());
    P.xab = S.xab.data();
  }
  if (!a8) {
    if (x_bf16 || has_lam) {
      P.xm = Q.xs;
    } else {
      P.xm = static_cast<const float*>(x.untyped_data());
    }
    P.ldx = IN;
  }

  // A8 panel path: VNNI, enough tokens, every segment on a 4-row boundary.
  std::vector<int32_t>& xqi = S.xqi;
  if (a8 && P.isa == kAvx512Vnni && T >= EnvInt("LQER_PANEL_MIN_T", 2 * kPanelTT)) {
    bool aligned = true;
    for (int64_t k = 0; k < P.nseg; ++k) aligned &= P.seg[k].begin % 4 == 0;
    if (aligned) {
      const int64_t ntb = (T + kPanelTT - 1) / kPanelTT;
      P.nsteps = (IN + 3) / 4;
      xqi.assign(static_cast<size_t>(ntb * P.nsteps * kPanelTT), 0);
      for (int64_t t = 0; t < T; ++t) {
        const int8_t* q = P.xq + t * P.ldq;
        int32_t* dst = xqi.data() + (t / kPanelTT) * P.nsteps * kPanelTT + t % kPanelTT;
        for (int64_t k = 0; k < P.nsteps; ++k) std::memcpy(dst + k * kPanelTT, q + 4 * k, 4);
      }
      P.xqi = xqi.data();
    }
  }

  std::vector<uint32_t>& xbi = S.xbi;
  if (use_bf16) {
    const int64_t ntb = (T + kBf16TT - 1) / kBf16TT;
    P.npairs = (IN + 1) / 2;
    xbi.assign(static_cast<size_t>(ntb * P.npairs * kBf16TT), 0);
    for (int64_t t = 0; t < T; ++t) {
      const float* xr = P.xm + t * P.ldx;
      uint32_t* dst = xbi.data() + (t / kBf16TT) * P.npairs * kBf16TT + t % kBf16TT;
      for (int64_t k = 0; k < P.npairs; ++k) {
        const uint32_t hi = 2 * k + 1 < IN ? Bf16Bits(xr[2 * k + 1]) : 0u;
        dst[k * kBf16TT] = Bf16Bits(xr[2 * k]) | (hi << 16);
      }
    }
    P.xbi = xbi.data();
  }

  // ---- main: column tasks.
  const Tiling tl = ChooseTiling(P);
  const int64_t align = 64;
  // Column tasks per thread: 4 for T > 1 (balance); at T = 1 tasks at
  // least ~1 KB wide (narrow ones restart the row-block sweep too often).
  const int64_t per_thread = EnvInt(
      "LQER_TASKS_PER_THREAD",
      T == 1 ? std::clamp<int64_t>(H / (nthreads * 1024), 1, 4) : 4);
  int64_t ntasks = std::max<int64_t>(1, std::min<int64_t>(nthreads * per_thread,
                                                          (H + align - 1) / align));
  if (nthreads == 1) ntasks = 1;
  std::vector<int64_t> cut(ntasks + 1);
  for (int64_t k = 0; k <= ntasks; ++k) {
    int64_t c = (H * k / ntasks + align / 2) / align * align;
    cut[k] = k == ntasks ? H : std::min(H, c);
  }
  const bool pf_wrap = EnvInt("LQER_PF_WRAP", 1) != 0;
  auto column_task = [&](int k) {
    const int64_t c0 = cut[k], c1 = cut[k + 1];
    if (c0 >= c1) return;
    if (P.xab) InitYBf16(P, c0, c1);
    else InitY(P, c0, c1);
    if (P.xqi) {  // A8 panel path
      thread_local std::vector<uint8_t> panel_buf;
      panel_buf.resize(static_cast<size_t>((rb / 4 * 4 + 4) * 64 + 64));
      __m512i* panel = reinterpret_cast<__m512i*>(
          (reinterpret_cast<uintptr_t>(panel_buf.data()) + 63) & ~uintptr_t{63});
      const int64_t ntb = (T + kPanelTT - 1) / kPanelTT;
      for (int64_t blk = 0; blk < P.nblocks; ++blk) {
        const int64_t r0 = P.seg[P.block_seg[blk]].begin;
        const int64_t r1 = P.seg[P.block_seg[blk + 1] - 1].end;
        for (int64_t c = c0; c < c1; c += 32) {
          const int64_t nc = std::min<int64_t>(32, c1 - c);
          A8BuildPanelVnni(P, r0, r1, c, nc, panel);
          for (int64_t tb = 0; tb < ntb; ++tb) {
            const int64_t tt = std::min<int64_t>(kPanelTT, T - tb * kPanelTT);
            for (int64_t si = P.block_seg[blk]; si < P.block_seg[blk + 1]; ++si)
              A8PanelTileVnni(P, si, panel, r0, c, nc, tb, tt);
          }
        }
      }
      return;
    }
    if (P.xbi) {  // bf16 panel path
      alignas(64) static const uint8_t kZeros[64] = {};
      thread_local std::vector<uint8_t> panel_buf;
      panel_buf.resize(static_cast<size_t>((rb / 2 + 1) * 4 * 64 + 64));
      __m512i* panel = reinterpret_cast<__m512i*>(
          (reinterpret_cast<uintptr_t>(panel_buf.data()) + 63) & ~uintptr_t{63});
      const int64_t ntb = (T + kBf16TT - 1) / kBf16TT;
      for (int64_t blk = 0; blk < P.nblocks; ++blk) {
        const int64_t r0 = P.seg[P.block_seg[blk]].begin;
        const int64_t r1 = P.seg[P.block_seg[blk + 1] - 1].end;
        for (int64_t c = c0; c < c1; c += 32) {
          const int64_t nc = std::min<int64_t>(32, c1 - c);
          Bf16BuildPanel(P, r0, r1, c, nc, kZeros, panel);
          for (int64_t tb = 0; tb < ntb; ++tb) {
            const int64_t tt = std::min<int64_t>(kBf16TT, T - tb * kBf16TT);
            for (int64_t si = P.block_seg[blk]; si < P.block_seg[blk + 1]; ++si)
              Bf16PanelTile(P, si, panel, r0, c, nc, tb, tt);
          }
        }
      }
      return;
    }
    // Prefetch `pf` bytes ahead in row-block order: near the end of the
    // task's columns, the same rows' successors in the next row block.
    Problem Pt = P;
    for (int64_t blk = 0; blk < P.nblocks; ++blk) {
      const int64_t rows_blk = P.seg[P.block_seg[blk + 1] - 1].end -
                               P.seg[P.block_seg[blk]].begin;
      for (int64_t c = c0; c < c1; c += tl.tw) {
        const int64_t nc = std::min(tl.tw, c1 - c);
        if (P.pf && pf_wrap) {
          // Position pf bytes ahead in (row block, column) order within the
          // task's columns [c0, c1): same rows or ahead by whole row blocks.
          const int64_t width = c1 - c0, ahead = c - c0 + P.pf;
          Pt.pf = (ahead / width) * rows_blk * H + (c0 + ahead % width - c);
        }
        for (int64_t t0 = 0; t0 < T; t0 += tl.tt) {
          const int64_t tt = std::min(tl.tt, T - t0);
          for (int64_t si = P.block_seg[blk]; si < P.block_seg[blk + 1]; ++si)
            RunTile(Pt, tl, si, c, nc, t0, tt);
        }
      }
    }
  };
  if (ntasks == 1) column_task(0);
  else pool.Run(static_cast<int>(ntasks), nthreads, column_task);
  return E::Success();
}

ffi::Error MatmulF32(ffi::AnyBuffer x, ffi::AnyBuffer packed, ffi::AnyBuffer scale,
                     ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer a_scale,
                     ffi::AnyBuffer b_scale, ffi::AnyBuffer lam,
                     ffi::AnyBuffer row_scale, int32_t lam_in_branch,
                     int32_t act_tile, ffi::Result<ffi::AnyBuffer> y) {
  return Matmul(false, x, packed, scale, a, b, a_scale, b_scale, lam,
                row_scale, lam_in_branch, act_tile, y);
}

ffi::Error MatmulA8(ffi::AnyBuffer x, ffi::AnyBuffer packed, ffi::AnyBuffer scale,
                    ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer a_scale,
                    ffi::AnyBuffer b_scale, ffi::AnyBuffer lam,
                    ffi::AnyBuffer row_scale, int32_t lam_in_branch,
                    int32_t act_tile, ffi::Result<ffi::AnyBuffer> y) {
  return Matmul(true, x, packed, scale, a, b, a_scale, b_scale, lam,
                row_scale, lam_in_branch, act_tile, y);
}

}  // namespace
}  // namespace lqer

#define LQER_BINDING                            \
  ffi::Ffi::Bind()                              \
      .Arg<ffi::AnyBuffer>()  /* x */           \
      .Arg<ffi::AnyBuffer>()  /* packed */      \
      .Arg<ffi::AnyBuffer>()  /* scale */       \
      .Arg<ffi::AnyBuffer>()  /* a */           \
      .Arg<ffi::AnyBuffer>()  /* b */           \
      .Arg<ffi::AnyBuffer>()  /* a_scale */     \
      .Arg<ffi::AnyBuffer>()  /* b_scale */     \
      .Arg<ffi::AnyBuffer>()  /* lam */         \
      .Arg<ffi::AnyBuffer>()  /* row_scale */   \
      .Attr<int32_t>("lam_in_branch")           \
      .Attr<int32_t>("act_tile")                \
      .Ret<ffi::AnyBuffer>()  /* y */

#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(LqerInt4MatmulF32, lqer::MatmulF32, LQER_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LqerInt4MatmulA8, lqer::MatmulA8, LQER_BINDING);

extern "C" {

// Name of the instruction set a call would use now (cpuid capped by
// LQER_ISA), for logging.
const char* lqer_isa() { return lqer::kIsaNames[lqer::CurrentIsa()]; }

// The hardware's best instruction set (ignores LQER_ISA).
const char* lqer_hardware_isa() { return lqer::kIsaNames[lqer::HardwareIsa()]; }

// Whether bfloat16 inputs from 16 tokens on multiply with AVX-512 BF16 dot
// products now (the hardware has them and LQER_ISA does not cap them off).
int lqer_bf16_dots() {
  return lqer::HardwareBf16() && lqer::CurrentIsa() == lqer::kAvx512Vnni;
}

// Threads a call would use now (LQER_NUM_THREADS or hardware_concurrency).
int lqer_num_threads() { return lqer::NumThreads(); }

}  // extern "C"
#pragma GCC visibility pop
