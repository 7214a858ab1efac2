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
// Both calls split their work over XLA:CPU's intra-op thread pool when it has more than one
// thread (matmul: chunks of panels; attention: (row, KV head) pairs). Each output element is
// computed whole by one thread, so results do not depend on the thread count.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64), aligned(4)));

inline v16 load(const float* p) {
  v16 r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}

inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }

constexpr int kRows = 8;    // rows per register tile
constexpr int kPanel = 32;  // columns per packed panel: two 16-float vectors

// y[0:MB, c0:c0+cols] = x[0:MB] @ panel, where the panel is w[:, c0:c0+32] stored k-major
// ([K, 32], contiguous): the whole panel streams past 2 x MB accumulators held in registers.
template <int MB>
void PanelRows(const float* x, const float* panel, float* y, int64_t k, int64_t n, int64_t c0,
               int64_t cols) {
  v16 acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = v16{};
  const float* wp = panel;
  for (int64_t i = 0; i < k; ++i, wp += kPanel) {
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
    for (int64_t r = 0; r < m; r += kRows) {
      const float* xr = x + r * k;
      float* yr = y + r * n;
      switch (m - r < kRows ? m - r : kRows) {
        case 1: PanelRows<1>(xr, panel, yr, k, n, c0, cols); break;
        case 2: PanelRows<2>(xr, panel, yr, k, n, c0, cols); break;
        case 3: PanelRows<3>(xr, panel, yr, k, n, c0, cols); break;
        case 4: PanelRows<4>(xr, panel, yr, k, n, c0, cols); break;
        case 5: PanelRows<5>(xr, panel, yr, k, n, c0, cols); break;
        case 6: PanelRows<6>(xr, panel, yr, k, n, c0, cols); break;
        case 7: PanelRows<7>(xr, panel, yr, k, n, c0, cols); break;
        default: PanelRows<8>(xr, panel, yr, k, n, c0, cols); break;
      }
    }
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

typedef int vi16 __attribute__((vector_size(64)));

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
