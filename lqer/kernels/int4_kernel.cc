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
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

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

// ---------------------------------------------------------------------------
// A small persistent thread pool. Run(n, k, fn) runs fn(0..n-1) on the
// caller and up to k-1 workers. Tasks are claimed from one atomic word that
// also holds the job's generation and task count, so a worker that wakes
// late (the cores are shared) finds the job gone and claims nothing; the
// caller never waits for a worker that has not started a task, it runs what
// is left itself and waits only for tasks in flight. Workers spin for
// LQER_SPIN_US (default 50) after a job, then sleep on a condition variable;
// all spinning yields every 64 pauses, so two of our threads sharing one
// core (the other one busy) hand it over at once instead of after a spin.

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }

  void Run(int n_tasks, int n_threads, const std::function<void(int)>& fn) {
    if (n_tasks <= 0) return;
    n_threads = std::min(n_threads, n_tasks);
    std::unique_lock<std::mutex> run_lock(run_mu_, std::try_to_lock);
    if (n_threads <= 1 || !run_lock.owns_lock() || n_tasks >= (1 << 20)) {
      // Serial, or busy (a call on another thread): run inline.
      for (int i = 0; i < n_tasks; ++i) fn(i);
      return;
    }
    Grow(n_threads - 1);
    spin_us_.store(EnvInt("LQER_SPIN_US", 50), std::memory_order_relaxed);
    active_.store(n_threads - 1, std::memory_order_relaxed);
    fn_.store(&fn, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    gen_ = (gen_ + 1) & kGenMask;
    state_.store(Pack(gen_, n_tasks, 0), std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lk(mu_);
      cv_.notify_all();
    }
    Work(gen_);
    // Wait for tasks in flight. Yield early: when the worker shares this
    // core (the other is busy), spinning only delays it.
    int spins = 0;
    while (done_.load(std::memory_order_acquire) < n_tasks) {
      if (++spins < 64) _mm_pause();
      else std::this_thread::yield();
    }
  }

 private:
  static constexpr uint64_t kGenMask = (1ull << 24) - 1;
  static uint64_t Pack(uint64_t gen, uint64_t n, uint64_t next) {
    return (gen << 40) | (n << 20) | next;
  }

  // Claims and runs tasks of job `gen` until none is left.
  void Work(uint64_t gen) {
    uint64_t st = state_.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t g = st >> 40, n = (st >> 20) & 0xfffff, next = st & 0xfffff;
      if (g != gen || next >= n) return;
      if (state_.compare_exchange_weak(st, st + 1, std::memory_order_acq_rel)) {
        (*fn_.load(std::memory_order_relaxed))(static_cast<int>(next));
        done_.fetch_add(1, std::memory_order_release);
        st = state_.load(std::memory_order_acquire);
      }
    }
  }

  void Grow(int n) {
    while (static_cast<int>(threads_.size()) < n) {
      const int id = static_cast<int>(threads_.size());
      threads_.emplace_back([this, id] { Loop(id); });
    }
  }

  void Loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t g = state_.load(std::memory_order_acquire) >> 40;
      if (g == seen) {
        auto t0 = std::chrono::steady_clock::now();
        const int64_t spin_us = spin_us_.load(std::memory_order_relaxed);
        int k = 0;
        while ((g = state_.load(std::memory_order_acquire) >> 40) == seen) {
          _mm_pause();
          if ((++k & 63) == 0) {
            if (std::chrono::duration_cast<std::chrono::microseconds>(
                    std::chrono::steady_clock::now() - t0)
                    .count() >= spin_us)
              break;
            std::this_thread::yield();  // cooperative if sharing a core
          }
        }
        if (g == seen) {
          std::unique_lock<std::mutex> lk(mu_);
          sleeping_.fetch_add(1, std::memory_order_seq_cst);
          while ((g = state_.load(std::memory_order_seq_cst) >> 40) == seen &&
                 !stop_)
            cv_.wait(lk);
          sleeping_.fetch_sub(1, std::memory_order_seq_cst);
          if (stop_) return;
        }
      }
      seen = g;
      if (id < active_.load(std::memory_order_relaxed)) Work(g);
    }
  }

  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::thread> threads_;
  std::atomic<const std::function<void(int)>*> fn_{nullptr};
  std::atomic<uint64_t> state_{0};
  std::atomic<int> done_{0};
  std::atomic<int> active_{0};
  std::atomic<int> sleeping_{0};
  std::atomic<int64_t> spin_us_{50};
  uint64_t gen_ = 0;
  bool stop_ = false;
};

Pool& GetPool() {
  static Pool* pool = new Pool;  // never destroyed: workers may outlive exit
  return *pool;
}

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

// ---------------------------------------------------------------------------
// AVX2 kernels.

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

// ---------------------------------------------------------------------------
// AVX-512 kernels.

LQER_AVX512 LQER_INLINE __mmask16 Mask16(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff)
                 : (n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1));
}

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
  alignas(64) static const uint8_t kIdx[2][64] = {
#define LQ_I(k) (k), 32 + (k), 64 + (k), 96 + (k)
      {LQ_I(0), LQ_I(1), LQ_I(2), LQ_I(3), LQ_I(4), LQ_I(5), LQ_I(6), LQ_I(7),
       LQ_I(8), LQ_I(9), LQ_I(10), LQ_I(11), LQ_I(12), LQ_I(13), LQ_I(14),
       LQ_I(15)},
      {LQ_I(16), LQ_I(17), LQ_I(18), LQ_I(19), LQ_I(20), LQ_I(21), LQ_I(22),
       LQ_I(23), LQ_I(24), LQ_I(25), LQ_I(26), LQ_I(27), LQ_I(28), LQ_I(29),
       LQ_I(30), LQ_I(31)}};
#undef LQ_I
  const __m512i idx0 = _mm512_load_si512(kIdx[0]);
  const __m512i idx1 = _mm512_load_si512(kIdx[1]);
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  const __m512i x08 = _mm512_set1_epi8(0x08);
  __mmask32 m[NB];
  #pragma GCC unroll 16
  for (int b = 0; b < NB; ++b) {
    int64_t n = ncols - 32 * b;
    m[b] = n >= 32 ? 0xffffffffu : (n <= 0 ? 0u : ((1u << n) - 1u));
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
  alignas(64) static const uint8_t kIdx[2][64] = {
#define LQ_I(k) (k), 32 + (k), 64 + (k), 96 + (k)
      {LQ_I(0), LQ_I(1), LQ_I(2), LQ_I(3), LQ_I(4), LQ_I(5), LQ_I(6), LQ_I(7),
       LQ_I(8), LQ_I(9), LQ_I(10), LQ_I(11), LQ_I(12), LQ_I(13), LQ_I(14),
       LQ_I(15)},
      {LQ_I(16), LQ_I(17), LQ_I(18), LQ_I(19), LQ_I(20), LQ_I(21), LQ_I(22),
       LQ_I(23), LQ_I(24), LQ_I(25), LQ_I(26), LQ_I(27), LQ_I(28), LQ_I(29),
       LQ_I(30), LQ_I(31)}};
#undef LQ_I
  const __m512i idx0 = _mm512_load_si512(kIdx[0]);
  const __m512i idx1 = _mm512_load_si512(kIdx[1]);
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  const __m512i x08 = _mm512_set1_epi8(0x08);
  constexpr int kTernAndXor = ((0xf0 & 0xcc) ^ 0xaa);
  const __mmask32 m = ncols >= 32 ? 0xffffffffu : ((1u << ncols) - 1u);
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

// InitY on AVX-512: packed columns [c0, c1) of both halves.
template <int D>
LQER_AVX512 void InitYAvx512(const Problem& P, int64_t c0, int64_t c1) {
  constexpr int TT = 6;
  for (int h = 0; h < 2; ++h) {
    const int64_t e = h * P.H + c1;
    for (int64_t col = h * P.H + c0; col < e; col += 64) {
      const int64_t n = std::min<int64_t>(64, e - col);
      if (P.R == 0) {
        for (int64_t t = 0; t < P.T; ++t)
          std::memset(P.y + t * P.OUT + col, 0, n * sizeof(float));
        continue;
      }
      int64_t t = 0;
      for (; t + TT <= P.T; t += TT) InitYTileAvx512<D, TT>(P, col, n, t);
      for (; t < P.T; ++t) InitYTileAvx512<D, 1>(P, col, n, t);
    }
  }
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

LQER_BF16 LQER_INLINE __mmask32 Mask32(int64_t n) {
  return n >= 32 ? ~__mmask32{0} : (n <= 0 ? 0 : (__mmask32{1} << n) - 1);
}

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
  constexpr int TT = 6;
  for (int h = 0; h < 2; ++h) {
    const int64_t e = h * P.H + c1;
    for (int64_t col = h * P.H + c0; col < e; col += 64) {
      const int64_t n = std::min<int64_t>(64, e - col);
      int64_t t = 0;
      for (; t + TT <= P.T; t += TT) InitYTileBf16<TT>(P, col, n, t);
      for (; t < P.T; ++t) InitYTileBf16<1>(P, col, n, t);
    }
  }
}

// xab[t, k] = bf16(xa[t, 2k]) | bf16(xa[t, 2k + 1]) << 16 (0 past R).
void PackXaBf16(const float* xa, int64_t T, int64_t R, uint32_t* xab) {
  const int64_t np = (R + 1) / 2;
  auto bits = [](float f) {
    const float r = RoundBf16(f);
    uint32_t u;
    std::memcpy(&u, &r, 4);
    return u >> 16;
  };
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < np; ++k) {
      const int64_t r = 2 * k;
      const uint32_t hi = r + 1 < R ? bits(xa[t * R + r + 1]) : 0u;
      xab[t * np + k] = bits(xa[t * R + r]) | (hi << 16);
    }
}

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

// ---------------------------------------------------------------------------
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
    auto bits = [](float f) {
      uint32_t u;
      std::memcpy(&u, &f, 4);
      return u >> 16;  // exact: f holds a bfloat16 value
    };
    for (int64_t t = 0; t < T; ++t) {
      const float* xr = P.xm + t * P.ldx;
      uint32_t* dst = xbi.data() + (t / kBf16TT) * P.npairs * kBf16TT + t % kBf16TT;
      for (int64_t k = 0; k < P.npairs; ++k) {
        const uint32_t hi = 2 * k + 1 < IN ? bits(xr[2 * k + 1]) : 0u;
        dst[k * kBf16TT] = bits(xr[2 * k]) | (hi << 16);
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
