// Part of int4_kernel.cc: tiling and the dispatch of one tile to its
// kernel.

#pragma once

#include "float_tiles.h"
#include "a8_tiles.h"

namespace lqer {
namespace {

// ---------------------------------------------------------------------------
// Dispatch of one (segment, column tile, token block) to a kernel.

struct Tiling {
  int64_t tw;  // tile width (packed columns)
  int64_t tt;  // tokens per block
};

Tiling ChooseTiling(const Problem& P) {
  const bool one = P.T == 1;
  switch (P.isa) {
    case kAvx512Vnni:
      if (P.a8) return one ? Tiling{64, 1} : Tiling{32, std::clamp<int64_t>(EnvInt("LQER_A8_TT", 4), 1, 6)};
      [[fallthrough]];
    case kAvx512:
      if (P.a8) return one ? Tiling{16, 1} : Tiling{16, 2};
      if (one) return Tiling{64, 1};
      if (EnvInt("LQER_F32_TW", 32) == 16)
        return Tiling{16, std::clamp<int64_t>(EnvInt("LQER_F32_TT", 8), 1, 8)};
      return Tiling{32, std::clamp<int64_t>(EnvInt("LQER_F32_TT", 6), 1, 6)};
    case kAvx2:
      if (P.a8) return one ? Tiling{16, 1} : Tiling{16, 2};
      return one ? Tiling{32, 1} : Tiling{16, 2};
    default:
      return Tiling{16, 4};
  }
}

template <int NC>
LQER_AVX512 void F32Avx512Dispatch(const Problem& P, const Segment& s,
                                   int64_t c, int64_t ncols, int64_t t0,
                                   int64_t tt) {
  switch (tt) {
    case 1: return F32TileAvx512<NC, 1>(P, s, c, ncols, t0);
    case 2: return F32TileAvx512<NC, 2>(P, s, c, ncols, t0);
    case 3: return F32TileAvx512<NC, 3>(P, s, c, ncols, t0);
    case 4: return F32TileAvx512<NC, 4>(P, s, c, ncols, t0);
    case 5: return F32TileAvx512<NC, 5>(P, s, c, ncols, t0);
    default: break;
  }
  if constexpr (NC == 1) {
    switch (tt) {
      case 6: return F32TileAvx512<1, 6>(P, s, c, ncols, t0);
      case 7: return F32TileAvx512<1, 7>(P, s, c, ncols, t0);
      case 8: return F32TileAvx512<1, 8>(P, s, c, ncols, t0);
      default: return F32TileAvx512<1, 8>(P, s, c, ncols, t0);
    }
  }
  return F32TileAvx512<NC, 6>(P, s, c, ncols, t0);
}

void RunTile(const Problem& P, const Tiling& tl, int64_t si, int64_t c,
             int64_t ncols, int64_t t0, int64_t tt) {
  const Segment& s = P.seg[si];
  if (P.a8) {
    switch (P.isa) {
      case kAvx512Vnni:
        if (tl.tw == 64) {
          if (tt == 1) return A8TileVnni<2, 1>(P, si, c, ncols, t0);
          if (tt == 2) return A8TileVnni<2, 2>(P, si, c, ncols, t0);
        }
        switch (tt) {
          case 1: return A8TileVnni<1, 1>(P, si, c, ncols, t0);
          case 2: return A8TileVnni<1, 2>(P, si, c, ncols, t0);
          case 3: return A8TileVnni<1, 3>(P, si, c, ncols, t0);
          case 4: return A8TileVnni<1, 4>(P, si, c, ncols, t0);
          case 5: return A8TileVnni<1, 5>(P, si, c, ncols, t0);
          default: return A8TileVnni<1, 6>(P, si, c, ncols, t0);
        }
      case kAvx512:
      case kAvx2:
        if (ncols == 16) {
          if (tt == 1) return A8TileAvx2<1>(P, si, c, t0);
          return A8TileAvx2<2>(P, si, c, t0);
        }
        return A8TileScalar(P, si, c, ncols, t0, tt);
      default:
        return A8TileScalar(P, si, c, ncols, t0, tt);
    }
  }
  switch (P.isa) {
    case kAvx512Vnni:
    case kAvx512:
      if (tl.tw == 64) {
        switch (P.f32_mode * 4 + static_cast<int>(tt)) {
          case 1: return F32TileAvx512<4, 1>(P, s, c, ncols, t0);
          case 2: return F32TileAvx512<4, 2>(P, s, c, ncols, t0);
          case 3: return F32TileAvx512<4, 3>(P, s, c, ncols, t0);
          case 5: return F32TileAvx512<4, 1, true>(P, s, c, ncols, t0);
          case 6: return F32TileAvx512<4, 2, true>(P, s, c, ncols, t0);
          case 7: return F32TileAvx512<4, 3, true>(P, s, c, ncols, t0);
          case 9: return F32TileAvx512Dw<1, 0>(P, s, c, ncols, t0);
          case 10: return F32TileAvx512Dw<2, 0>(P, s, c, ncols, t0);
          case 11: return F32TileAvx512Dw<3, 0>(P, s, c, ncols, t0);
          case 13: return F32TileAvx512Dw<1, 1>(P, s, c, ncols, t0);
          case 14: return F32TileAvx512Dw<2, 1>(P, s, c, ncols, t0);
          case 15: return F32TileAvx512Dw<3, 1>(P, s, c, ncols, t0);
          case 17: return F32TileAvx512Dw<1, 2>(P, s, c, ncols, t0);
          case 18: return F32TileAvx512Dw<2, 2>(P, s, c, ncols, t0);
          case 19: return F32TileAvx512Dw<3, 2>(P, s, c, ncols, t0);
          default: break;
        }
      }
      if (tl.tw == 16) return F32Avx512Dispatch<1>(P, s, c, ncols, t0, tt);
      return F32Avx512Dispatch<2>(P, s, c, ncols, t0, tt);
    case kAvx2:
      if (ncols == 32 && tt == 1) return F32TileAvx2<4, 1>(P, s, c, t0);
      if (ncols == 16) {
        if (tt == 1) return F32TileAvx2<2, 1>(P, s, c, t0);
        return F32TileAvx2<2, 2>(P, s, c, t0);
      }
      if (ncols == 8) {
        if (tt == 1) return F32TileAvx2<1, 1>(P, s, c, t0);
        if (tt == 2) return F32TileAvx2<1, 2>(P, s, c, t0);
      }
      return F32TileScalar(P, s, c, ncols, t0, tt);
    default:
      return F32TileScalar(P, s, c, ncols, t0, tt);
  }
}

}  // namespace
}  // namespace lqer
