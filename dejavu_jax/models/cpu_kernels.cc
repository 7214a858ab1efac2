// Small-row float32 matmuls for XLA:CPU as FFI custom calls (see cpu_kernels.py).
//
// Why: a decode step multiplies a few rows (the batch) by every weight matrix once, so its cost
// should be the time to stream the weights from memory. XLA:CPU's dots reach ~25-35 GFLOP/s per
// core at 8 rows (0.26-0.35 of the read bandwidth, benchmarks/decode_matmul.py). Here the weights
// are packed once (cpu_kernels.pack) into 32-column panels stored k-major, and each panel streams
// past 8 rows x 32 columns of accumulators held in vector registers.
//
// Built on first use with -march=native (GCC vector extensions: 512-bit registers where the CPU
// has AVX-512, pairs of 256-bit ones under AVX2). Every output row depends only on its own input
// row, summed over k in the same order whatever the number of rows, so a row's result does not
// depend on which other rows share its call (microbatches, batch sizes).
//
// The quantized matmul reads weights stored as GGUF-style Q4_1 / Q8_0 blocks (see below) and
// rebuilds each float32 weight exactly in registers: a fifth of the bytes per decode step.
//
// All calls split their work over XLA:CPU's intra-op thread pool when it has more than one
// thread (matmul: chunks of panels; attention: (row, KV head) pairs). Each output element is
// computed whole by one thread, so results do not depend on the thread count.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64), aligned(4)));

// One unaligned 64-byte load (v16 is 4-byte aligned). Not a memcpy into a local: GCC compiles
// that to two 32-byte loads, stores and a 64-byte reload, a store-forwarding stall per load.
inline v16 load(const float* p) { return *reinterpret_cast<const v16*>(p); }

inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }

constexpr int kRows = 8;    // rows per register tile
constexpr int kPanel = 32;  // columns per packed panel: two 16-float vectors
constexpr int64_t kPanelPrefetch = 64;

// y[0:MB, c0:c0+cols] = x[0:MB] @ panel, where the panel is w[:, c0:c0+32] stored k-major
// ([K, 32], contiguous): the whole panel streams past 2 x MB accumulators held in registers.
template <int MB>
void PanelRows(const float* x, const float* panel, float* y, int64_t k, int64_t n, int64_t c0,
               int64_t cols) {
  v16 acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = v16{};
  const float* wp = panel;
  for (int64_t i = 0; i < k; ++i, wp += kPanel) {
    // both cache lines of the panel row kPanelPrefetch rows ahead (see QTile)
    __builtin_prefetch(wp + kPanelPrefetch * kPanel);
    __builtin_prefetch(wp + kPanelPrefetch * kPanel + 16);
    const v16 w0 = load(wp), w1 = load(wp + 16);
    for (int m = 0; m < MB; ++m) {
      const float xs = x[m * k + i];
      acc[m][0] += xs * w0;
      acc[m][1] += xs * w1;
    }
  }
  for (int m = 0; m < MB; ++m) {
    float* out = y + m * n + c0;
    if (cols == kPanel) {
      store(out, acc[m][0]);
      store(out + 16, acc[m][1]);
    } else {
      float tmp[kPanel];
      store(tmp, acc[m][0]);
      store(tmp + 16, acc[m][1]);
      std::memcpy(out, tmp, sizeof(float) * cols);
    }
  }
}

// Runs body(chunk) for chunk in [0, chunks) on the calling thread and on XLA's intra-op thread
// pool. Chunks are claimed from a shared counter, so the caller never waits for a task that has
// not started (the pool may be busy or run tasks inline: XLA promises no parallelism); it waits
// only for chunks another thread already claimed. A task that starts late finds nothing left.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t chunks, const Body& body) {
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  if (helpers <= 0) {
    for (int64_t c = 0; c < chunks; ++c) body(c);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto shared = std::make_shared<Shared>();
  // Helpers hold `shared` (it outlives this call if they start late) and a copy of `body`; a late
  // helper never calls `body`, whose captures may be gone by then.
  auto work = [shared, body, chunks]() {
    for (int64_t c; (c = shared->next.fetch_add(1)) < chunks;) {
      body(c);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  while (shared->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// body(r, std::integral_constant<int, MB>) for the rows [r, r + MB) of m, in blocks of up to
// kRows: the register tiles are templates on their row count.
template <typename Body>
void ForRowBlocks(int64_t m, const Body& body) {
  for (int64_t r = 0; r < m; r += kRows) {
    switch (m - r < kRows ? m - r : kRows) {
      case 1: body(r, std::integral_constant<int, 1>{}); break;
      case 2: body(r, std::integral_constant<int, 2>{}); break;
      case 3: body(r, std::integral_constant<int, 3>{}); break;
      case 4: body(r, std::integral_constant<int, 4>{}); break;
      case 5: body(r, std::integral_constant<int, 5>{}); break;
      case 6: body(r, std::integral_constant<int, 6>{}); break;
      case 7: body(r, std::integral_constant<int, 7>{}); break;
      default: body(r, std::integral_constant<int, 8>{}); break;
    }
  }
}

// y [M, N] = x [M, K] @ w, with w packed as [ceil(N / 32), K, 32] (columns past N are zero),
// panels [p0, p1) only. Panel-major so that the weights are read once, front to back, in one
// sequential stream; a panel (K x 128 bytes) stays in L2 while the row blocks after the first
// re-read it.
void PackedMatmul(const float* x, const float* w, float* y, int64_t m, int64_t k, int64_t n,
                  int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* panel = w + p * k * kPanel;
    const int64_t c0 = p * kPanel;
    const int64_t cols = n - c0 < kPanel ? n - c0 : kPanel;
    ForRowBlocks(m, [&](int64_t r, auto mb) {
      PanelRows<decltype(mb)::value>(x + r * k, panel, y + r * n, k, n, c0, cols);
    });
  }
}

// Weight bytes per parallel chunk: large enough that a chunk outweighs scheduling it (a few
// microseconds), small enough that the LM head and the MLP split over the pool's threads.
constexpr int64_t kChunkBytes = 512 << 10;

ffi::Error PackedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2)
    return ffi::Error::InvalidArgument("dejavu packed matmul: x [M, K], w [P, K, 32], y [M, N]");
  const int64_t m = xd[0], k = xd[1], n = yd[1];
  if (wd[1] != k || wd[2] != kPanel || wd[0] != (n + kPanel - 1) / kPanel || yd[0] != m)
    return ffi::Error::InvalidArgument("dejavu packed matmul: shapes do not match");
  const int64_t panels = (n + kPanel - 1) / kPanel;
  const int64_t per = std::max<int64_t>(1, kChunkBytes / (k * kPanel * 4));
  const int64_t chunks = (panels + per - 1) / per;
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  // A row's result does not depend on how panels are split: each output column is one panel's.
  ParallelFor(pool, chunks, [=](int64_t c) {
    PackedMatmul(xp, wp, yp, m, k, n, c * per, std::min(panels, (c + 1) * per));
  });
  return ffi::Error::Success();
}


// ---- block-quantized weights (the values of GGUF Q4_1 and Q8_0 tensors, exactly) ----
//
// A [K, N] matrix whose float32 values are, block by block of 32 along K in each column,
//   Q4_1: d * q + m, d float16, q in 0..15, m float32   (24 bytes: d, m as float32, 16 bytes of
//         nibbles, q[j] low and q[j + 16] high)
//   Q8_0: d * q,     d float16, q in -128..127          (36 bytes: d as float32, 32 int8)
// is stored in groups of 8 columns, block-interleaved: [ceil(N / 8), K / 32, 8, bytes], so a tile
// of the group's columns reads one sequential stream (columns past N: zero blocks). d * q is exact
// in float32 (11 x 8 significant bits at most), so the fused multiply-add the compiler may form
// computes the same value as the separate multiply and add that produced the weights: each weight
// equals the float32 weight bit for bit. A decode step reads 0.19 (Q4_1) or 0.28 (Q8_0) of the
// float32 bytes.
constexpr int kQBlock = 32;
constexpr int kQGroup = 8;
constexpr int kQ4Bytes = 24;
constexpr int kQ8Bytes = 36;
constexpr int64_t kPrefetchRows = 32;

typedef uint8_t vb16 __attribute__((vector_size(16), aligned(1)));
typedef int32_t vq16 __attribute__((vector_size(64)));
typedef int vi16 __attribute__((vector_size(64)));

struct Q4 {
  static constexpr int kBytes = kQ4Bytes;
  static inline void Dequant(const uint8_t* blk, v16& w0, v16& w1) {
    float d, m;
    std::memcpy(&d, blk, 4);
    std::memcpy(&m, blk + 4, 4);
    vb16 q;
    std::memcpy(&q, blk + 8, 16);
    // via int32: GCC scalarizes a direct uint8 -> float conversion (16 scalar converts)
    w0 = __builtin_convertvector(__builtin_convertvector(q & 15, vq16), v16) * d + m;
    w1 = __builtin_convertvector(__builtin_convertvector(q >> 4, vq16), v16) * d + m;
  }
};

// 16 int8 -> 16 floats. GCC 12 scalarizes a vector-extension int8 -> int32 conversion of loaded
// bytes (16 scalar sign-extends), hence the intrinsics where AVX-512 is there.
inline v16 Int8ToFloat(const uint8_t* p) {
#ifdef __AVX512F__
  return (v16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#else
  vb16 u;
  std::memcpy(&u, p, 16);
  return __builtin_convertvector(__builtin_convertvector(u ^ 128, vq16) - 128, v16);
#endif
}

struct Q8 {
  static constexpr int kBytes = kQ8Bytes;
  static inline void Dequant(const uint8_t* blk, v16& w0, v16& w1) {
    float d;
    std::memcpy(&d, blk, 4);
    w0 = Int8ToFloat(blk + 4) * d;
    w1 = Int8ToFloat(blk + 20) * d;
  }
};

// The sum of a vector's 16 lanes, halves folded in a fixed order.
inline float ReduceLanes(v16 a) {
  const vi16 h8 = {8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15};
  const vi16 h4 = {4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7};
  const vi16 h2 = {2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3};
  const vi16 h1 = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
  a += __builtin_shuffle(a, h8);
  a += __builtin_shuffle(a, h4);
  a += __builtin_shuffle(a, h2);
  a += __builtin_shuffle(a, h1);
  return a[0];
}

// y[0:MB, c0:c0+NC] = x[0:MB] @ w[:, c0:c0+NC], the NC columns inside one group (g, c0 % 8).
// Each block of the NC columns is dequantized once and used by every row. One accumulator per
// (row, column), both halves of each block added in the same order whatever MB and NC, so a
// row's sum is formed the same way in any tile.
template <class F, int MB, int NC>
void QTile(const float* x, const uint8_t* w, float* y, int64_t k, int64_t n, int64_t c0) {
  const int64_t kb = k / kQBlock;
  const int64_t row = kQGroup * F::kBytes;   // one block of the group's 8 columns
  const uint8_t* g = w + (c0 / kQGroup) * kb * row + (c0 % kQGroup) * F::kBytes;
  v16 acc[MB][NC];
  for (int r = 0; r < MB; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = v16{};
  for (int64_t b = 0; b < kb; ++b, g += row) {
    // the row kPrefetchRows ahead, every cache line of it (the hardware prefetcher alone
    // leaves a small matrix's stream at a third of the read bandwidth)
    for (int64_t off = 0; off < row; off += 64) __builtin_prefetch(g + kPrefetchRows * row + off);
    v16 w0[NC], w1[NC];
    for (int c = 0; c < NC; ++c) F::Dequant(g + c * F::kBytes, w0[c], w1[c]);
    for (int r = 0; r < MB; ++r) {
      const v16 x0 = load(x + r * k + b * kQBlock), x1 = load(x + r * k + b * kQBlock + 16);
      for (int c = 0; c < NC; ++c) {
        acc[r][c] += x0 * w0[c];
        acc[r][c] += x1 * w1[c];
      }
    }
  }
  for (int r = 0; r < MB; ++r)
    for (int c = 0; c < NC && c0 + c < n; ++c) y[r * n + c0 + c] = ReduceLanes(acc[r][c]);
}

// Rows in blocks of up to 8; the columns of groups [g0, g1) in tiles sized so that accumulators,
// dequantized weights and inputs fit the 32 vector registers (MB * NC + 2 * NC + 2).
template <class F, int MB>
void QRows(const float* x, const uint8_t* w, float* y, int64_t k, int64_t n, int64_t g0,
           int64_t g1) {
  constexpr int NC = MB == 1 ? 8 : (MB <= 4 ? 4 : 2);
  for (int64_t c = g0 * kQGroup; c < g1 * kQGroup; c += NC) QTile<F, MB, NC>(x, w, y, k, n, c);
}

template <class F>
void QMatmul(const float* x, const uint8_t* w, float* y, int64_t m, int64_t k, int64_t n,
             int64_t g0, int64_t g1) {
  ForRowBlocks(m, [&](int64_t r, auto mb) {
    QRows<F, decltype(mb)::value>(x + r * k, w, y + r * n, k, n, g0, g1);
  });
}

ffi::Error QMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                       ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 4 || yd.size() != 2)
    return ffi::Error::InvalidArgument(
        "dejavu quantized matmul: x [M, K], w [ceil(N/8), K/32, 8, 24 or 36], y [M, N]");
  const int64_t m = xd[0], k = xd[1], n = yd[1];
  const int64_t groups = (n + kQGroup - 1) / kQGroup, bytes = wd[3];
  if (k % kQBlock || wd[0] != groups || wd[1] != k / kQBlock || wd[2] != kQGroup ||
      (bytes != kQ4Bytes && bytes != kQ8Bytes) || yd[0] != m)
    return ffi::Error::InvalidArgument("dejavu quantized matmul: shapes do not match");
  const int64_t per = std::max<int64_t>(1, kChunkBytes / (k / kQBlock * kQGroup * bytes));
  const int64_t chunks = (groups + per - 1) / per;
  const float* xp = x.typed_data();
  const uint8_t* wp = w.typed_data();
  float* yp = y->typed_data();
  // Each output column is one tile's, whole: results do not depend on the split.
  ParallelFor(pool, chunks, [=](int64_t c) {
    const int64_t g0 = c * per, g1 = std::min(groups, (c + 1) * per);
    if (bytes == kQ4Bytes) QMatmul<Q4>(xp, wp, yp, m, k, n, g0, g1);
    else QMatmul<Q8>(xp, wp, yp, m, k, n, g0, g1);
  });
  return ffi::Error::Success();
}

inline float Dot(const float* a, const float* b, int64_t k) {
  v16 acc = v16{};
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) acc += load(a + i) * load(b + i);
  float s = 0.f;
  for (int j = 0; j < 16; ++j) s += acc[j];
  for (; i < k; ++i) s += a[i] * b[i];
  return s;
}

inline void Axpy(float a, const float* x, float* y, int64_t k) {
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) store(y + i, load(y + i) + a * load(x + i));
  for (; i < k; ++i) y[i] += a * x[i];
}

// scores[0:vis] <- exp(score - max) in place, with the new entry's score s_new in the max and the
// sum; returns the sum and sets *e_new to the new entry's weight.
inline float ExpScores(float* scores, int64_t vis, float s_new, float* e_new) {
  float top = s_new;
  for (int64_t c = 0; c < vis; ++c) top = scores[c] > top ? scores[c] : top;
  float denom = 0.f;
  for (int64_t c = 0; c < vis; ++c) {
    scores[c] = std::exp(scores[c] - top);
    denom += scores[c];
  }
  *e_new = std::exp(s_new - top);
  return denom + *e_new;
}


inline v16 Shuffle(v16 a, v16 b, vi16 m) { return __builtin_shuffle(a, b, m); }

// Lane j of the result = the sum of the lanes of v[j]: 16 dot products finished with 15 vector
// adds, where summing each vector's lanes one by one costs a 16-add dependency chain per score.
inline v16 SumLanes16(const v16* v) {
  const vi16 lo1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const vi16 hi1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const vi16 lo2 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const vi16 hi2 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
  const vi16 lo3 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
  const vi16 hi3 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
  const vi16 lo4 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const vi16 hi4 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  v16 r1[8], r2[4], r3[2];
  for (int i = 0; i < 8; ++i)
    r1[i] = Shuffle(v[2 * i], v[2 * i + 1], lo1) + Shuffle(v[2 * i], v[2 * i + 1], hi1);
  for (int i = 0; i < 4; ++i)
    r2[i] = Shuffle(r1[2 * i], r1[2 * i + 1], lo2) + Shuffle(r1[2 * i], r1[2 * i + 1], hi2);
  for (int i = 0; i < 2; ++i)
    r3[i] = Shuffle(r2[2 * i], r2[2 * i + 1], lo3) + Shuffle(r2[2 * i], r2[2 * i + 1], hi3);
  return Shuffle(r3[0], r3[1], lo4) + Shuffle(r3[0], r3[1], hi4);
}

// One query (NQ x 16 floats) over `vis` cached keys/values (position c at k + c * stride) plus
// the new entry: scores 16 positions at a time, the output accumulated in registers.
template <int NQ>
void AttendHead(const float* q, const float* k, const float* v, int64_t stride, int64_t vis,
                const float* knew, const float* vnew, float scale, float slope, float p_new,
                float* scores, float* out) {
  v16 qv[NQ];
  for (int i = 0; i < NQ; ++i) qv[i] = load(q + 16 * i);
  const v16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  for (int64_t c0 = 0; c0 < vis; c0 += 16) {
    const int64_t n = vis - c0 < 16 ? vis - c0 : 16;
    v16 acc[16];
    for (int64_t c = 0; c < 16; ++c) {
      acc[c] = v16{};
      if (c < n) {
        const float* kc = k + (c0 + c) * stride;
        for (int i = 0; i < NQ; ++i) acc[c] += qv[i] * load(kc + 16 * i);
      }
    }
    const v16 pos = lane + static_cast<float>(c0);
    store(scores + c0, SumLanes16(acc) * scale + slope * pos);
  }
  v16 kq = v16{};
  for (int i = 0; i < NQ; ++i) kq += qv[i] * load(knew + 16 * i);
  float s_new = 0.f;
  for (int j = 0; j < 16; ++j) s_new += kq[j];
  s_new = s_new * scale + slope * p_new;
  float e_new;
  const float denom = ExpScores(scores, vis, s_new, &e_new);
  v16 o[NQ];
  for (int i = 0; i < NQ; ++i) o[i] = e_new * load(vnew + 16 * i);
  for (int64_t c = 0; c < vis; ++c) {
    const float w = scores[c];
    const float* vc = v + c * stride;
    for (int i = 0; i < NQ; ++i) o[i] += w * load(vc + 16 * i);
  }
  const float inv = 1.f / denom;
  for (int i = 0; i < NQ; ++i) store(out + 16 * i, o[i] * inv);
}

// One decode query per row and head over layer `layer` of the stacked cache (read in place: the
// cache is an operand as a whole, so XLA copies no slice) plus the row's new entry. Keys at
// positions below the row's position are visible (at most `context`); a row at a negative
// position (padding) sees nothing and gets the mean of the slice and the new entry, as the XLA
// formulation's all-masked softmax gives. Scores: q . k * scale + slope[h] * key position.
ffi::Error AttendDecodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_all,
                            ffi::Buffer<ffi::F32> v_all, ffi::Buffer<ffi::F32> k_new,
                            ffi::Buffer<ffi::F32> v_new, ffi::Buffer<ffi::S32> pos,
                            ffi::Buffer<ffi::F32> slopes, ffi::ResultBuffer<ffi::F32> out,
                            int64_t layer, int64_t context, float scale) {
  auto qd = q.dimensions(), cd = k_all.dimensions();
  if (qd.size() != 3 || cd.size() != 5)
    return ffi::Error::InvalidArgument("dejavu attend: q [B, H, K], cache [L, B, S, Hkv, K]");
  const int64_t b = qd[0], h = qd[1], kd = qd[2];
  const int64_t l = cd[0], s = cd[2], hkv = cd[3];
  if (cd[1] != b || cd[4] != kd || h % hkv != 0 || layer < 0 || layer >= l || context < 1 ||
      context > s)
    return ffi::Error::InvalidArgument("dejavu attend: shapes, layer or context do not match");
  const int64_t g = h / hkv;
  const float* qp = q.typed_data();
  const float* kc = k_all.typed_data() + layer * b * s * hkv * kd;
  const float* vc = v_all.typed_data() + layer * b * s * hkv * kd;
  const float* kn = k_new.typed_data();
  const float* vn = v_new.typed_data();
  const int32_t* ps = pos.typed_data();
  const float* sl = slopes.typed_data();
  float* o = out->typed_data();
  const int nq = kd % 16 == 0 ? static_cast<int>(kd / 16) : 0;
  const bool fast = nq == 1 || nq == 2 || nq == 4 || nq == 8;
  // One chunk per (row, KV head): its G query heads share the K/V rows they read.
  ParallelFor(pool, b * hkv, [=](int64_t rk) {
    thread_local std::vector<float> scores;
    // + 16: the fast path stores whole 16-position blocks.
    if (static_cast<int64_t>(scores.size()) < g * context + 16) scores.resize(g * context + 16);
    const int64_t r = rk / hkv, kv = rk % hkv;
    const int64_t p = ps[r];
    const int64_t vis = p < 0 ? 0 : (p < context ? p : context);
    const float* krow = kc + (r * s * hkv + kv) * kd;   // position c at krow + c * hkv * kd
    const float* vrow = vc + (r * s * hkv + kv) * kd;
    const float* knew = kn + (r * hkv + kv) * kd;
    const float* vnew = vn + (r * hkv + kv) * kd;
    float* outs = o + (r * h + kv * g) * kd;
    if (p < 0) {
      for (int64_t j = 0; j < g; ++j) {
        float* out_j = outs + j * kd;
        for (int64_t i = 0; i < kd; ++i) out_j[i] = 0.f;
        for (int64_t c = 0; c < context; ++c) Axpy(1.f, vrow + c * hkv * kd, out_j, kd);
        Axpy(1.f, vnew, out_j, kd);
        const float inv = 1.f / static_cast<float>(context + 1);
        for (int64_t i = 0; i < kd; ++i) out_j[i] *= inv;
      }
      return;
    }
    if (fast) {
      for (int64_t j = 0; j < g; ++j) {
        const int64_t head = kv * g + j;
        const float* qj = qp + (r * h + head) * kd;
        float* out_j = outs + j * kd;
        const float pn = static_cast<float>(p);
        switch (nq) {
          case 1: AttendHead<1>(qj, krow, vrow, hkv * kd, vis, knew, vnew, scale, sl[head], pn,
                                scores.data(), out_j); break;
          case 2: AttendHead<2>(qj, krow, vrow, hkv * kd, vis, knew, vnew, scale, sl[head], pn,
                                scores.data(), out_j); break;
          case 4: AttendHead<4>(qj, krow, vrow, hkv * kd, vis, knew, vnew, scale, sl[head], pn,
                                scores.data(), out_j); break;
          default: AttendHead<8>(qj, krow, vrow, hkv * kd, vis, knew, vnew, scale, sl[head], pn,
                                 scores.data(), out_j); break;
        }
      }
      return;
    }
    for (int64_t c = 0; c < vis; ++c) {
      const float* kvec = krow + c * hkv * kd;
      for (int64_t j = 0; j < g; ++j)
        scores[j * context + c] = Dot(qp + (r * h + kv * g + j) * kd, kvec, kd) * scale +
                                  sl[kv * g + j] * static_cast<float>(c);
    }
    for (int64_t j = 0; j < g; ++j) {
      const float* qj = qp + (r * h + kv * g + j) * kd;
      float* sj = scores.data() + j * context;
      const float s_new = Dot(qj, knew, kd) * scale + sl[kv * g + j] * static_cast<float>(p);
      float e_new;
      const float denom = ExpScores(sj, vis, s_new, &e_new);
      float* out_j = outs + j * kd;
      for (int64_t i = 0; i < kd; ++i) out_j[i] = 0.f;
      for (int64_t c = 0; c < vis; ++c) Axpy(sj[c], vrow + c * hkv * kd, out_j, kd);
      Axpy(e_new, vnew, out_j, kd);
      const float inv = 1.f / denom;
      for (int64_t i = 0; i < kd; ++i) out_j[i] *= inv;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DejavuPackedMatmul, PackedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DejavuQMatmul, QMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [M, K]
                                  .Arg<ffi::Buffer<ffi::U8>>()    // w [N/8, K/32, 8, 24|36]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [M, N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(DejavuAttendDecode, AttendDecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q [B, H, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_all [L, B, S, Hkv, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v_all
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_new [B, Hkv, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v_new
                                  .Arg<ffi::Buffer<ffi::S32>>()   // positions [B]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // ALiBi slopes [H] (or 0)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // [B, H, K]
                                  .Attr<int64_t>("layer")
                                  .Attr<int64_t>("context")
                                  .Attr<float>("scale"));
