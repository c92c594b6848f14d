// Few-row matrix products for the fast decode path (dsv3/infer/decode/kernels.py has the contract).
//
// out[m, :] (+)= alpha * x[m, :] @ w for a handful of rows m, w [K, N] in FP32 or BF16 (widened
// to FP32 as it is loaded: exact), FP32 accumulation. One decode token reads each weight once, so
// the loop is shaped for streaming (see `block`). Compiled with -mavx2 -mfma; loaded only on CPUs
// that have both.
//
// Threads: with -fopenmp, at::parallel_for splits a product's output columns (in runs of kCols,
// a multiple of 8), the attention's heads and the per-head W_UK / W_UV products across torch's
// intra-op threads (torch.set_num_threads). Every output element is computed by one thread with the
// same sequence of operations whatever the split (a column's vector-or-scalar path depends only on
// its index in the whole matrix), so results do not depend on the thread count.
//
// Shapes: M rows, K inputs, N outputs, E experts, I expert hidden size, D model dim.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <immintrin.h>

#include "streamed.h"
#include "widen.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using dsv3::load1;
using dsv3::load8;
using dsv3::Packed;

// y[m][0:N] = (acc ? y[m] : 0) + alpha * x[m][0:K] @ w for M <= 4 rows, w row r at w + r * ldw.
// Weight rows are read in order, four at a time, each as one contiguous run per panel of up to
// 1024 columns whose sums stay in L1 (the pattern the hardware prefetcher follows best: a 4 MB head
// ~1.7x faster from memory than 64-column tiles, which touch a new page per row), and every weight
// loaded is used for all M rows: M rows cost one read of w.
// Software prefetch, kAhead weight rows ahead, one cache line per row and line of the panel: the
// hardware prefetcher ramps up per stream and a panel's row is only 2-4 KB (a new stream every few
// hundred loads); measured on the AMD EPYC (Zen 4, 1 thread, from memory) BF16 GEMVs stream
// ~1.3-1.5x faster with it (e.g. [1536, 2048] 302 -> 223 us, ~28 GB/s), FP32 ones ~1.05-1.1x.
constexpr int64_t kAhead = 8;

template <int M, typename T>
void block(const float* const* x, const T* w, int64_t ldw, float* const* y, int64_t K, int64_t N, float alpha,
           bool acc) {
  constexpr int64_t kPanel = 1024, kLine = 64 / sizeof(T);  // kLine: weights per cache line
  alignas(32) float sum[M][kPanel];
  for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
    const int64_t nw = std::min(kPanel, N - n0), nv = nw & ~int64_t{7};
    for (int m = 0; m < M; ++m) std::fill(sum[m], sum[m] + nw, 0.f);
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
      const T* r0 = w + k * ldw + n0;
      const T *r1 = r0 + ldw, *r2 = r1 + ldw, *r3 = r2 + ldw;
      const T* ahead = k + kAhead + 4 <= K ? r0 + kAhead * ldw : nullptr;  // the rows kAhead further on
      __m256 xb[M][4];
      for (int m = 0; m < M; ++m)
        for (int j = 0; j < 4; ++j) xb[m][j] = _mm256_set1_ps(x[m][k + j]);
      for (int64_t n = 0; n < nv; n += 8) {
        if (ahead && n % kLine == 0)
          for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(ahead + j * ldw + n), _MM_HINT_T0);
        const __m256 w0 = load8(r0 + n), w1 = load8(r1 + n), w2 = load8(r2 + n), w3 = load8(r3 + n);
        for (int m = 0; m < M; ++m) {
          __m256 a = _mm256_load_ps(sum[m] + n);
          a = _mm256_fmadd_ps(xb[m][0], w0, a);
          a = _mm256_fmadd_ps(xb[m][1], w1, a);
          a = _mm256_fmadd_ps(xb[m][2], w2, a);
          a = _mm256_fmadd_ps(xb[m][3], w3, a);
          _mm256_store_ps(sum[m] + n, a);
        }
      }
      for (int64_t n = nv; n < nw; ++n) {
        const float v0 = load1(r0 + n), v1 = load1(r1 + n), v2 = load1(r2 + n), v3 = load1(r3 + n);
        for (int m = 0; m < M; ++m)
          sum[m][n] += x[m][k] * v0 + x[m][k + 1] * v1 + x[m][k + 2] * v2 + x[m][k + 3] * v3;
      }
    }
    for (; k < K; ++k) {
      const T* r0 = w + k * ldw + n0;
      for (int m = 0; m < M; ++m) {
        const __m256 xk = _mm256_set1_ps(x[m][k]);
        for (int64_t n = 0; n < nv; n += 8)
          _mm256_store_ps(sum[m] + n, _mm256_fmadd_ps(xk, load8(r0 + n), _mm256_load_ps(sum[m] + n)));
        for (int64_t n = nv; n < nw; ++n) sum[m][n] += x[m][k] * load1(r0 + n);
      }
    }
    for (int m = 0; m < M; ++m) {
      float* out = y[m] + n0;
      for (int64_t n = 0; n < nw; ++n) out[n] = acc ? out[n] + alpha * sum[m][n] : alpha * sum[m][n];
    }
  }
}

// one thread: all M rows against w's N columns
template <typename T>
void few_serial(const float* const* x, int64_t M, const T* w, int64_t ldw, float* const* y, int64_t K, int64_t N,
                float alpha, bool acc) {
  for (int64_t m = 0; m < M; m += 4) {
    switch (std::min<int64_t>(4, M - m)) {
      case 1: block<1>(x + m, w, ldw, y + m, K, N, alpha, acc); break;
      case 2: block<2>(x + m, w, ldw, y + m, K, N, alpha, acc); break;
      case 3: block<3>(x + m, w, ldw, y + m, K, N, alpha, acc); break;
      default: block<4>(x + m, w, ldw, y + m, K, N, alpha, acc);
    }
  }
}

constexpr int64_t kCols = 64;               // columns per unit of work split across threads (multiple of 8)
// an expert's rows on its strips from this many rows (experts_rows), fewer on the row-major loop: one
// to three rows through a V3-shaped expert ([7168, 4096], [2048, 7168]) ran 0.88-0.99x the loop's
// speed on the strips, four 1.0-1.07x, six 1.9-2.3x (Zen 3, 1 thread, out of cache)
constexpr int64_t kStripMinRows = 4;
constexpr int64_t kMinWeights = 1 << 15;  // weights per thread below which a fork costs more than it saves

// few_serial with the columns split across torch's threads, in runs of kCols: each thread reads its
// own slab of every weight row. A column ends in block's scalar tail only when it is one of the
// last N % 8 of w, whatever the split (every run but the last is a multiple of 8 wide).
template <typename T>
void few(const float* const* x, int64_t M, const T* w, int64_t ldw, float* const* y, int64_t K, int64_t N,
         float alpha, bool acc) {
  const int64_t runs = (N + kCols - 1) / kCols;
  const int64_t grain = std::max<int64_t>(1, kMinWeights / std::max<int64_t>(1, K * kCols));
  if (runs <= grain || at::get_num_threads() == 1 || at::in_parallel_region()) {
    few_serial(x, M, w, ldw, y, K, N, alpha, acc);
    return;
  }
  at::parallel_for(0, runs, grain, [&](int64_t r0, int64_t r1) {
    const int64_t n0 = r0 * kCols, n1 = std::min(N, r1 * kCols);
    std::vector<float*> ys(M);
    for (int64_t m = 0; m < M; ++m) ys[m] = y[m] + n0;
    few_serial(x, M, w + n0, ldw, ys.data(), K, n1 - n0, alpha, acc);
  });
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, ": expected a 2-d tensor with unit column stride");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, ": expected float32, got ", t.scalar_type());
}

void check_weight(const torch::Tensor& w, int64_t K) {
  TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1, "w: expected a 2-d tensor with unit column stride");
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 || w.scalar_type() == torch::kBFloat16,
              "w: expected float32 or bfloat16, got ", w.scalar_type());
  TORCH_CHECK(w.size(0) == K, "w: ", w.size(0), " rows for ", K, " inputs");
}

// every row of x against w into out (all [M, *] with unit column stride), up to 4 rows per read of w
void rows(const torch::Tensor& x, const torch::Tensor& w, torch::Tensor& out, float alpha, bool acc) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(1);
  std::vector<const float*> xs(M);
  std::vector<float*> ys(M);
  for (int64_t m = 0; m < M; ++m) {
    xs[m] = x.data_ptr<float>() + m * x.stride(0);
    ys[m] = out.data_ptr<float>() + m * out.stride(0);
  }
  if (w.scalar_type() == torch::kBFloat16)
    few(xs.data(), M, reinterpret_cast<const uint16_t*>(w.data_ptr()), w.stride(0), ys.data(), K, N, alpha, acc);
  else
    few(xs.data(), M, w.data_ptr<float>(), w.stride(0), ys.data(), K, N, alpha, acc);
}

// x [M, K] @ w [K, N] (+ bias [M, N]) -> new [M, N]
torch::Tensor mm(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  check_rows(x, "x");
  check_weight(w, x.size(1));
  if (bias.has_value()) {
    check_rows(*bias, "bias");
    TORCH_CHECK(bias->size(0) == x.size(0) && bias->size(1) == w.size(1), "bias: shape ", bias->sizes());
    auto out = bias->clone(at::MemoryFormat::Contiguous);
    rows(x, w, out, 1.f, true);
    return out;
  }
  auto out = torch::empty({x.size(0), w.size(1)}, x.options());
  rows(x, w, out, 1.f, false);
  return out;
}

// out [M, N] += alpha * x [M, K] @ w [K, N], in place
void addmm_(torch::Tensor out, const torch::Tensor& x, const torch::Tensor& w, double alpha) {
  check_rows(x, "x");
  check_rows(out, "out");
  check_weight(w, x.size(1));
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) == w.size(1), "out: shape ", out.sizes());
  rows(x, w, out, static_cast<float>(alpha), true);
}

// out [G, M, N] with f(g, xs, ys) run for each group g of x [G, M, K] (xs: its M rows, ys: out[g]'s),
// the groups split across torch's threads
template <typename F>
torch::Tensor per_group(const torch::Tensor& x, int64_t N, F&& f) {
  const int64_t G = x.size(0), M = x.size(1);
  auto out = torch::empty({G, M, N}, x.options());
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    std::vector<const float*> xs(M);
    std::vector<float*> ys(M);
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t m = 0; m < M; ++m) {
        xs[m] = x.data_ptr<float>() + g * x.stride(0) + m * x.stride(1);
        ys[m] = out.data_ptr<float>() + (g * M + m) * N;
      }
      f(g, xs.data(), ys.data());
    }
  });
  return out;
}

// ---- many rows on weights packed in strips (streamed.h; dsv3.infer.decode.gemm.Strips) ----

void check_strips(const torch::Tensor& data, int64_t N) {
  TORCH_CHECK(data.dim() == 4 && data.size(3) == dsv3::kStripCols && data.is_contiguous() &&
                  (data.scalar_type() == torch::kFloat32 || data.scalar_type() == torch::kInt16),
              "packed: expected pack_strips' [count, strips, K, 16] tensor, got ", data.scalar_type(), " ",
              data.sizes());
  TORCH_CHECK(N > (data.size(1) - 1) * dsv3::kStripCols && N <= data.size(1) * dsv3::kStripCols, "n: ", N,
              " columns do not fill ", data.size(1), " strips");
}

// x [M, K] @ the strip-packed w [K, N] (+ bias [M, N]) -> new [M, N]; the strips split across torch's threads
torch::Tensor strips_mm(const torch::Tensor& x, const torch::Tensor& data, int64_t N,
                        const c10::optional<torch::Tensor>& bias) {
  check_rows(x, "x");
  check_strips(data, N);
  TORCH_CHECK(data.size(0) == 1, "packed: expected one matrix, got ", data.size(0));
  TORCH_CHECK(x.size(1) == data.size(2), "x: expected [M, ", data.size(2), "], got ", x.sizes());
  const int64_t M = x.size(0);
  torch::Tensor out;
  if (bias.has_value()) {
    check_rows(*bias, "bias");
    TORCH_CHECK(bias->size(0) == M && bias->size(1) == N, "bias: shape ", bias->sizes());
    out = bias->clone(at::MemoryFormat::Contiguous);
  } else {
    out = torch::empty({M, N}, x.options());
  }
  std::vector<const float*> xs(M);
  std::vector<float*> ys(M);
  for (int64_t m = 0; m < M; ++m) {
    xs[m] = x.data_ptr<float>() + m * x.stride(0);
    ys[m] = out.data_ptr<float>() + m * N;
  }
  dsv3::strips_product(xs.data(), M, data, N, 0, ys.data(), 1.f, bias.has_value(), false, kMinWeights);
  return out;
}

// x [G, M, K] @ the strip-packed w [G, K, N] -> [G, M, N], group g's rows times matrix g (MLA's W_UK
// and W_UV per head); the groups split across torch's threads
torch::Tensor strips_bmm(const torch::Tensor& x, const torch::Tensor& data, int64_t N) {
  check_strips(data, N);
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 3 && x.size(0) == data.size(0) &&
                  x.size(2) == data.size(2) && x.stride(2) == 1,
              "x: expected float32 [", data.size(0), ", M, ", data.size(2), "] (unit stride in the last), got ",
              x.scalar_type(), " ", x.sizes());
  const int64_t M = x.size(1);
  return per_group(x, N, [&](int64_t g, const float* const* xs, float* const* ys) {
    dsv3::strips_product(xs, M, data, N, g, ys, 1.f, false, true, kMinWeights);
  });
}

// ---- one row through the whole model: dsv3/infer/decode/step.py's single-sequence step in one call ----

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  float r = _mm_cvtss_f32(s);
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

// a . b with b a BF16 cache row (widened exactly on load), the same order of operations as `dot`
inline float dot(const float* a, const uint16_t* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), dsv3::load8(b + i), acc);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  float r = _mm_cvtss_f32(s);
  for (; i < n; ++i) r += a[i] * dsv3::load1(b + i);
  return r;
}

// The attention's two passes over a sequence's cache rows (RowDecoder::attend), for a group of
// heads at once: each cache row is read once per group instead of once per head, and the heads'
// sums are independent chains (one head's dot is a chain of W / 8 dependent FMAs: alone it waits on
// their latency, ~3 us per position per v3-mini step on the AMD EPYC). Every head's result is the
// same sequence of operations as one head alone (`dot`; a chain over positions in order), so the
// grouping, and so the thread split, does not change a bit.
constexpr int64_t kScoreHeads = 8, kSumHeads = 4;

// sc[h][j] = dot(q[h], k, n) for G <= kScoreHeads heads, with `dot`'s operations
template <int G, typename Pool>
void dots(const float* const* q, const Pool* k, int64_t n, float* const* sc, int64_t j) {
  __m256 acc[G];
  for (int h = 0; h < G; ++h) acc[h] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 kv = dsv3::load8(k + i);
    for (int h = 0; h < G; ++h) acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q[h] + i), kv, acc[h]);
  }
  for (int h = 0; h < G; ++h) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[h]), _mm256_extractf128_ps(acc[h], 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    float r = _mm_cvtss_f32(s);
    for (int64_t c = i; c < n; ++c) r += q[h][c] * dsv3::load1(k + c);
    sc[h][j] = r;
  }
}

template <typename Pool>
void group_dots(int64_t G, const float* const* q, const Pool* k, int64_t n, float* const* sc, int64_t j) {
  switch (G) {
    case 1: return dots<1>(q, k, n, sc, j);
    case 2: return dots<2>(q, k, n, sc, j);
    case 3: return dots<3>(q, k, n, sc, j);
    case 4: return dots<4>(q, k, n, sc, j);
    case 5: return dots<5>(q, k, n, sc, j);
    case 6: return dots<6>(q, k, n, sc, j);
    case 7: return dots<7>(q, k, n, sc, j);
    default: return dots<8>(q, k, n, sc, j);
  }
}

// out[h][i] = sum over j < St, in order, of p[h][j] * pool[rows[j] * W + i], i < R, for G <=
// kSumHeads heads: 16 columns of every head in registers while the positions stream past
template <int G, typename Pool>
void sums(const float* const* p, const Pool* pool, const int64_t* rows, int64_t W, int64_t St, int64_t R,
          float* const* out) {
  int64_t i = 0;
  for (; i + 16 <= R; i += 16) {
    __m256 acc[G][2];
    for (int h = 0; h < G; ++h) acc[h][0] = acc[h][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < St; ++j) {
      const Pool* k = pool + rows[j] * W + i;
      const __m256 k0 = dsv3::load8(k), k1 = dsv3::load8(k + 8);
      for (int h = 0; h < G; ++h) {
        const __m256 pj = _mm256_set1_ps(p[h][j]);
        acc[h][0] = _mm256_fmadd_ps(pj, k0, acc[h][0]);
        acc[h][1] = _mm256_fmadd_ps(pj, k1, acc[h][1]);
      }
    }
    for (int h = 0; h < G; ++h) {
      _mm256_storeu_ps(out[h] + i, acc[h][0]);
      _mm256_storeu_ps(out[h] + i + 8, acc[h][1]);
    }
  }
  for (; i < R; ++i)
    for (int h = 0; h < G; ++h) {
      float s = 0.f;
      for (int64_t j = 0; j < St; ++j) s = std::fma(p[h][j], dsv3::load1(pool + rows[j] * W + i), s);
      out[h][i] = s;
    }
}

template <typename Pool>
void group_sums(int64_t G, float* const* p, const Pool* pool, const int64_t* rows, int64_t W, int64_t St, int64_t R,
                float* const* out) {
  switch (G) {
    case 1: return sums<1>(p, pool, rows, W, St, R, out);
    case 2: return sums<2>(p, pool, rows, W, St, R, out);
    case 3: return sums<3>(p, pool, rows, W, St, R, out);
    default: return sums<4>(p, pool, rows, W, St, R, out);
  }
}

using dsv3::to_bf16;

inline void store(float* dst, float v) { *dst = v; }
inline void store(uint16_t* dst, float v) { *dst = to_bf16(v); }

inline float inv_rms(const float* x, int64_t n, double eps) {
  return 1.f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + static_cast<float>(eps));
}

inline float silu(float v) { return v / (1.f + std::exp(-v)); }

// y[m] (+)= alpha * x[m] @ w for M rows (any M, four per read of w), w a 2-d weight tensor (FP32
// or BF16, unit column stride); with `index`, w is a contiguous 3-d tensor and its matrix `index`
// is used (an expert)
// `serial`: on the calling thread only (a caller that already splits its work across threads)
void product(const float* const* x, int64_t M, const torch::Tensor& w, float* const* y, float alpha, bool acc,
             int64_t index = -1, bool serial = false) {
  const int64_t K = w.size(-2), N = w.size(-1), ld = w.stride(-2), off = index < 0 ? 0 : index * K * N;
  if (w.scalar_type() == torch::kBFloat16) {
    const auto* p = reinterpret_cast<const uint16_t*>(w.data_ptr()) + off;
    serial ? few_serial(x, M, p, ld, y, K, N, alpha, acc) : few(x, M, p, ld, y, K, N, alpha, acc);
  } else {
    const float* p = w.data_ptr<float>() + off;
    serial ? few_serial(x, M, p, ld, y, K, N, alpha, acc) : few(x, M, p, ld, y, K, N, alpha, acc);
  }
}

// product on w's streamed copy where the RowDecoder made one (`p` defined), else on w
void product(const float* const* x, int64_t M, const torch::Tensor& w, const Packed& p, float* const* y, float alpha,
             bool acc, int64_t index = -1, bool serial = false) {
  if (p.defined())
    dsv3::packed_product(x, M, p, y, alpha, acc, index < 0 ? 0 : index, serial, kMinWeights);
  else
    product(x, M, w, y, alpha, acc, index, serial);
}

// y[m] (+)= alpha * x[m] @ w[:, n0:n1] into y[m] + n0 .. n1 for M rows, on the calling thread (w 2-d,
// or with `index` the matrix `index` of a contiguous 3-d w;
// or its streamed copy `p` where defined, or its strips `strips` (pack_strips) where defined: n0 a
// multiple of the panel and strip widths, as every caller's runs are)
void product_cols(const float* const* x, int64_t M, const torch::Tensor& w, float* const* y, float alpha, bool acc,
                  int64_t index, int64_t n0, int64_t n1, const Packed& p = {}, const torch::Tensor& strips = {}) {
  static_assert(kCols % dsv3::kPanelCols == 0 && kCols % dsv3::kStripCols == 0, "column runs must be whole panels");
  if (strips.defined()) {
    dsv3::strips_range(x, M, strips, w.size(-1), index < 0 ? 0 : index, y, alpha, acc, n0 / dsv3::kStripCols,
                       (n1 + dsv3::kStripCols - 1) / dsv3::kStripCols);
    return;
  }
  if (p.defined()) {
    dsv3::packed_serial(x, M, p, index, y, alpha, acc, n0 / dsv3::kPanelCols,
                        (n1 + dsv3::kPanelCols - 1) / dsv3::kPanelCols);
    return;
  }
  std::vector<float*> ys(M);
  for (int64_t m = 0; m < M; ++m) ys[m] = y[m] + n0;
  const int64_t K = w.size(-2), N = w.size(-1), ld = w.stride(-2), off = (index < 0 ? 0 : index * K * N) + n0;
  if (w.scalar_type() == torch::kBFloat16)
    few_serial(x, M, reinterpret_cast<const uint16_t*>(w.data_ptr()) + off, ld, ys.data(), K, n1 - n0, alpha, acc);
  else
    few_serial(x, M, w.data_ptr<float>() + off, ld, ys.data(), K, n1 - n0, alpha, acc);
}

// y[m] += sum_j gates[m J + j] * expert_e(xn[m]), e = ids[m J + j], for M rows; w13 [E, D, 2I],
// w2 [E, I, D] contiguous. Each chosen expert runs once for all the rows that chose it (its weights
// read once), the gate scaling the hidden so that w2 is read once too. Two parallel regions, not two
// per expert: every chosen expert's w1 | w3 columns (in runs of kCols) split across the threads,
// then w2's output columns, each thread adding the experts into its columns in the order of first
// use (the order, and so the sums, of one thread).
// p13, p2: w13's and w2's streamed copies where the RowDecoder made them (else undefined); s13, s2:
// their strips (pack_strips: the AVX2 register-tiled products of gemm.Strips) where given (else
// undefined), used for the experts chosen by at least kStripMinRows rows
void experts_rows(float* const* y, const float* const* xn, int64_t M, const torch::Tensor& w13,
                  const torch::Tensor& w2, const int64_t* ids, const double* gates, int64_t J,
                  const Packed& p13 = {}, const Packed& p2 = {}, const torch::Tensor& s13 = {},
                  const torch::Tensor& s2 = {}) {
  std::vector<std::vector<std::pair<int64_t, double>>> users(w13.size(0));  // expert -> (row, gate)
  std::vector<int64_t> order;  // experts in order of first use
  for (int64_t i = 0; i < M * J; ++i) {
    if (users[ids[i]].empty()) order.push_back(ids[i]);
    users[ids[i]].push_back({i / J, gates[i]});
  }
  const int64_t D = w13.size(1), I = w2.size(1), n_e = static_cast<int64_t>(order.size()), pairs = M * J;
  std::vector<float> t(pairs * 2 * I), h(pairs * I);  // per (row, expert) pair: w1 | w3 outputs, gated hidden
  std::vector<const float*> xs(pairs), hs(pairs);
  std::vector<float*> ts(pairs), ys(pairs);
  std::vector<float> gs(pairs);
  std::vector<int64_t> first(n_e + 1);  // expert k's pairs are first[k] .. first[k + 1] - 1
  int64_t p = 0;
  for (int64_t k = 0; k < n_e; ++k) {
    first[k] = p;
    for (const auto& [row, gate] : users[order[k]]) {
      xs[p] = xn[row];
      ys[p] = y[row];
      ts[p] = t.data() + p * 2 * I;
      hs[p] = h.data() + p * I;
      gs[p++] = static_cast<float>(gate);
    }
  }
  first[n_e] = p;
  const int64_t runs = (2 * I + kCols - 1) / kCols;  // of w1 | w3, per expert
  at::parallel_for(0, n_e * runs, std::max<int64_t>(1, kMinWeights / (D * kCols)), [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e;) {  // the consecutive runs of one expert in one call: a contiguous slab
      const int64_t k = task / runs, last = std::min(e, (k + 1) * runs);
      const int64_t n0 = (task % runs) * kCols, n1 = std::min(2 * I, ((last - 1) % runs + 1) * kCols);
      const int64_t n = first[k + 1] - first[k];
      product_cols(xs.data() + first[k], n, w13, ts.data() + first[k], 1.f, false, order[k], n0, n1, p13,
                   n >= kStripMinRows ? s13 : torch::Tensor());
      task = last;
    }
  });
  for (int64_t q = 0; q < pairs; ++q)
    for (int64_t i = 0; i < I; ++i) h[q * I + i] = gs[q] * (silu(ts[q][i]) * ts[q][I + i]);
  const int64_t cols = (D + kCols - 1) / kCols;
  const int64_t grain = std::max<int64_t>(1, kMinWeights / std::max<int64_t>(1, n_e * I * kCols));
  at::parallel_for(0, cols, grain, [&](int64_t b, int64_t e) {
    const int64_t n0 = b * kCols, n1 = std::min(D, e * kCols);
    for (int64_t k = 0; k < n_e; ++k) {
      const int64_t n = first[k + 1] - first[k];
      product_cols(hs.data() + first[k], n, w2, ys.data() + first[k], 1.f, true, order[k], n0, n1, p2,
                   n >= kStripMinRows ? s2 : torch::Tensor());
    }
  });
}

// out [M, D] += sum_j gates[m, j] * w2[e] (silu(xn[m] @ w1[e]) * (xn[m] @ w3[e])), e = ids[m, j];
// w13 [E, D, 2I] holds w1 | w3, w2 [E, I, D]; ids and gates row-major [M, J]; p13, p2: their
// streamed copies where defined (RowDecoder::experts_); s13, s2: their strips where defined (strips_experts_)
void experts_(torch::Tensor out, const torch::Tensor& xn, const torch::Tensor& w13, const torch::Tensor& w2,
              const std::vector<int64_t>& ids, const std::vector<double>& gates, const Packed& p13 = {},
              const Packed& p2 = {}, const torch::Tensor& s13 = {}, const torch::Tensor& s2 = {}) {
  check_rows(out, "out");
  check_rows(xn, "xn");
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3 && w13.is_contiguous() && w2.is_contiguous(),
              "w13, w2: expected contiguous [E, D, 2I] and [E, I, D]");
  TORCH_CHECK(w13.scalar_type() == w2.scalar_type(), "w13, w2: dtypes differ");
  const int64_t M = xn.size(0), D = xn.size(1), E = w13.size(0), I = w2.size(1);
  TORCH_CHECK(w13.size(1) == D && w13.size(2) == 2 * I && w2.size(0) == E && w2.size(2) == D,
              "w13 ", w13.sizes(), " and w2 ", w2.sizes(), " do not fit dim ", D);
  TORCH_CHECK(out.size(0) == M && out.size(1) == D, "out: shape ", out.sizes());
  TORCH_CHECK(ids.size() == gates.size() && M > 0 && ids.size() % M == 0, "ids, gates: expected [M, J] each");
  const int64_t J = static_cast<int64_t>(ids.size()) / M;
  for (int64_t e : ids) TORCH_CHECK(e >= 0 && e < E, "ids: expert ", e, " out of range [0, ", E, ")");
  std::vector<float*> ys(M);
  std::vector<const float*> xs(M);
  for (int64_t m = 0; m < M; ++m) {
    ys[m] = out.data_ptr<float>() + m * out.stride(0);
    xs[m] = xn.data_ptr<float>() + m * xn.stride(0);
  }
  if (s13.defined()) {
    check_strips(s13, 2 * I);
    check_strips(s2, D);
    TORCH_CHECK(s13.size(0) == E && s13.size(2) == D && s2.size(0) == E && s2.size(2) == I,
                "strips: expected w13's and w2's pack_strips, got ", s13.sizes(), " and ", s2.sizes());
  }
  experts_rows(ys.data(), xs.data(), M, w13, w2, ids.data(), gates.data(), J, p13, p2, s13, s2);
}

struct Attn {  // dsv3.infer.decode.weights.AttnWeights
  torch::Tensor w_in, w_q, kv_norm, w_o, pool;  // pool: this layer's cache rows [slots, R + P], FP32 or BF16
  torch::Tensor w_uk, w_uv;  // [H, N, R], [H, R, V] when not folded (undefined when folded)
  int64_t q_rank, Qn, Vo;    // per-head query width before W_UK (N, or R folded), value width (V, or R)
  double norm_eps, q_eps, kv_eps;
  // where not folded into w_in / w_q (AttnWeights.stored): the input norm's weight [D] and
  // q_a_layernorm's [q_rank], FP32 (undefined when folded), and the query's scale after w_q (1 when folded)
  torch::Tensor norm_w, q_norm_w;
  float q_scale = 1.f;
  Packed p_in, p_q, p_o, p_uk, p_uv;  // the streamed copies (RowDecoder's `stream`), else undefined
};

struct Ffn {  // dsv3.infer.decode.weights.FfnWeights plus the MoE gate's settings (E = 0: a dense MLP)
  torch::Tensor w_in, w_down, norm_w, gate_w, bias, w13, w2;  // undefined when absent
  int64_t hidden, E, fused_gate, top_k, n_groups, topk_groups;
  bool sigmoid;
  double route_scale, norm_eps;
  Packed p_in, p_down, p_gate, p13, p2;  // the streamed copies (RowDecoder's `stream`), else undefined
};

class RowDecoder {
 public:
  // stream: keep a copy of every matrix packed for streaming (streamed.h) and read that instead of
  // the tensors given, with the AVX-512F loop where `wide` (the CPU must have it), else AVX2's
  RowDecoder(int64_t heads, int64_t rank, int64_t rope, bool stream, bool wide)
      : H(heads), R(rank), P(rope), stream_(stream), wide_(wide) {
    TORCH_CHECK(!wide || __builtin_cpu_supports("avx512f"), "wide: this CPU lacks AVX-512F");
  }

  // the output head w [D, V] (logits = head(x)), streamed too with `stream`
  void set_head(torch::Tensor w) {
    check_weight(w, w.size(0));
    head_ = w;
    if (stream_) p_head_ = dsv3::pack(w, wide_);
  }

  // x [M, D] -> x @ head [M, V]
  torch::Tensor logits(const torch::Tensor& x) {
    TORCH_CHECK(head_.defined(), "no head: set_head first");
    check_rows(x, "x");
    TORCH_CHECK(x.size(1) == head_.size(0), "x: expected [M, ", head_.size(0), "], got ", x.sizes());
    const int64_t M = x.size(0);
    auto out = torch::empty({M, head_.size(1)}, x.options());
    std::vector<const float*> xs(M);
    std::vector<float*> ys(M);
    for (int64_t m = 0; m < M; ++m) {
      xs[m] = x.data_ptr<float>() + m * x.stride(0);
      ys[m] = out.data_ptr<float>() + m * out.stride(0);
    }
    product(xs.data(), M, head_, p_head_, ys.data(), 1.f, false);
    return out;
  }

  // out [M, D] += the routed experts of xn [M, D] on MoE layer `layer`'s experts (the free experts_,
  // on this decoder's streamed copies where it keeps them): many-row decoding's few-row experts
  // (step.py FastDecoder._ffn) share the copies the one-row step reads
  void experts(int64_t layer, torch::Tensor out, const torch::Tensor& xn, const std::vector<int64_t>& ids,
               const std::vector<double>& gates) const {
    TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(ffn.size()) && ffn[layer].E > 0,
                "layer: ", layer, " is not a MoE layer of this decoder (", ffn.size(), " layers)");
    const Ffn& f = ffn[layer];
    experts_(out, xn, f.w13, f.w2, ids, gates, f.p13, f.p2);
  }

  // x [H, M, K] -> [H, M, N]: attention layer `layer`'s W_UK (uv false) or W_UV per head, x[h] @ w[h],
  // on this decoder's streamed copies where it keeps them (many-row decoding's absorbed MLA,
  // step.py FastDecoder._attention); the heads split across torch's threads
  torch::Tensor heads(int64_t layer, bool uv, const torch::Tensor& x) const {
    TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(attn.size()), "layer: ", layer, " out of range (",
                attn.size(), " layers)");
    const Attn& a = attn[layer];
    const torch::Tensor& w = uv ? a.w_uv : a.w_uk;
    const Packed& p = uv ? a.p_uv : a.p_uk;
    TORCH_CHECK(w.defined(), "layer ", layer, ": W_", uv ? "UV" : "UK", " is folded (no per-head matrices)");
    TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 3 && x.size(0) == H && x.size(2) == w.size(1) &&
                    x.stride(2) == 1,
                "x: expected float32 [", H, ", M, ", w.size(1), "], got ", x.scalar_type(), " ", x.sizes(),
                " (unit stride in the last)");
    const int64_t M = x.size(1);
    return per_group(x, w.size(2), [&](int64_t h, const float* const* xs, float* const* ys) {
      product(xs, M, w, p, ys, 1.f, false, h, true);
    });
  }

  // the bytes of the streamed copies (0 without `stream`)
  int64_t streamed_bytes() const {
    int64_t n = 0;
    auto add = [&](const Packed& p) { n += p.defined() ? static_cast<int64_t>(p.data.nbytes()) : 0; };
    for (const auto& a : attn) for (const auto* p : {&a.p_in, &a.p_q, &a.p_o, &a.p_uk, &a.p_uv}) add(*p);
    for (const auto& f : ffn) for (const auto* p : {&f.p_in, &f.p_down, &f.p_gate, &f.p13, &f.p2}) add(*p);
    add(p_head_);
    return n;
  }

  // w_uk [H, N, R] / w_uv [H, R, V]: the absorbed MLA products per head when W_UK / W_UV are not
  // folded into the query projection / o_proj (None when folded); norm_w [D] / q_norm_w [q_rank]: the
  // input norm's and q_a_layernorm's weights when not folded into w_in / w_q (None when folded),
  // q_scale: the softmax scale when not folded into the query's columns (1 when folded)
  void add_attention(torch::Tensor w_in, torch::Tensor w_q, torch::Tensor kv_norm, torch::Tensor w_o,
                     torch::Tensor pool, c10::optional<torch::Tensor> w_uk, c10::optional<torch::Tensor> w_uv,
                     int64_t q_rank, double norm_eps, double q_eps, double kv_eps,
                     c10::optional<torch::Tensor> norm_w, c10::optional<torch::Tensor> q_norm_w, double q_scale) {
    TORCH_CHECK(pool.dim() == 2 && pool.size(1) == R + P && pool.is_contiguous() &&
                    (pool.scalar_type() == torch::kFloat32 || pool.scalar_type() == torch::kBFloat16),
                "pool: expected contiguous float32 or bfloat16 [slots, ", R + P, "], got ", pool.scalar_type(), " ",
                pool.sizes());
    auto per_head = [&](const c10::optional<torch::Tensor>& t, const char* name, int64_t rows, int64_t cols) {
      if (!t.has_value()) return torch::Tensor();
      TORCH_CHECK(t->dim() == 3 && t->size(0) == H && t->is_contiguous() &&
                      (rows < 0 || t->size(1) == rows) && (cols < 0 || t->size(2) == cols) &&
                      (t->scalar_type() == torch::kFloat32 || t->scalar_type() == torch::kBFloat16),
                  name, ": expected a contiguous float32 or bfloat16 [", H, ", *, *] per-head matrix, got ", t->sizes());
      return *t;
    };
    const torch::Tensor uk = per_head(w_uk, "w_uk", -1, R), uv = per_head(w_uv, "w_uv", R, -1);
    const int64_t Qn = uk.defined() ? uk.size(1) : R, Vo = uv.defined() ? uv.size(2) : R;
    const int64_t Qin = q_rank ? w_q.size(1) : w_in.size(1) - q_rank - R - 2 * P;
    TORCH_CHECK(Qin == H * (Qn + P), "w_q: expected ", H * (Qn + P), " query columns (per head q_lat | q_pe), got ",
                Qin);
    TORCH_CHECK(w_o.size(0) == H * Vo, "w_o: expected ", H * Vo, " rows, got ", w_o.size(0));
    Attn a{w_in, w_q, kv_norm.contiguous(), w_o, pool, uk, uv, q_rank, Qn, Vo, norm_eps, q_eps, kv_eps};
    auto vec = [](const c10::optional<torch::Tensor>& t, const char* name, int64_t n) {
      if (!t.has_value()) return torch::Tensor();
      TORCH_CHECK(t->dim() == 1 && t->size(0) == n, name, ": expected [", n, "], got ", t->sizes());
      return t->to(torch::kFloat32).contiguous();
    };
    a.norm_w = vec(norm_w, "norm_w", w_in.size(0));
    a.q_norm_w = vec(q_norm_w, "q_norm_w", q_rank);
    a.q_scale = static_cast<float>(q_scale);
    if (stream_) {
      a.p_in = dsv3::pack(w_in, wide_);
      a.p_o = dsv3::pack(w_o, wide_);
      if (q_rank) a.p_q = dsv3::pack(w_q, wide_);
      if (uk.defined()) a.p_uk = dsv3::pack(uk, wide_);
      if (uv.defined()) a.p_uv = dsv3::pack(uv, wide_);
    }
    attn.push_back(a);
  }

  void add_ffn(c10::optional<torch::Tensor> w_in, c10::optional<torch::Tensor> w_down,
               c10::optional<torch::Tensor> norm_w, c10::optional<torch::Tensor> gate_w,
               c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> w13,
               c10::optional<torch::Tensor> w2, int64_t hidden, int64_t E, int64_t top_k, int64_t n_groups,
               int64_t topk_groups, bool sigmoid, double route_scale, double norm_eps) {
    auto get = [](const c10::optional<torch::Tensor>& t) { return t.has_value() ? *t : torch::Tensor(); };
    Ffn f{get(w_in), get(w_down), get(norm_w), get(gate_w), get(bias), get(w13), get(w2),
          hidden, E, 0, top_k, n_groups, topk_groups, sigmoid, route_scale, norm_eps};
    f.fused_gate = E > 0 && !f.gate_w.defined();
    TORCH_CHECK(E == 0 || (f.bias.defined() && f.w13.defined() && f.w2.defined() && f.w13.is_contiguous() &&
                           f.w2.is_contiguous() && f.w13.size(0) == E && f.bias.numel() == E),
                "a MoE layer needs its routing bias [E] and contiguous experts w13 [E, D, 2I], w2 [E, I, D]");
    if (f.norm_w.defined()) f.norm_w = f.norm_w.to(torch::kFloat32).contiguous();
    if (f.bias.defined()) TORCH_CHECK(f.bias.scalar_type() == torch::kFloat32 && f.bias.is_contiguous(),
                                      "bias: expected contiguous float32");
    if (stream_) {
      auto pack = [&](const torch::Tensor& t) { return t.defined() ? dsv3::pack(t, wide_) : Packed(); };
      f.p_in = pack(f.w_in), f.p_down = pack(f.w_down);
      // a router narrower than a panel (v3-mini's 16 experts) would read 64 / E times its bytes packed
      if (f.gate_w.defined() && f.gate_w.size(1) >= dsv3::kPanelCols) f.p_gate = pack(f.gate_w);
      f.p13 = pack(f.w13), f.p2 = pack(f.w2);
    }
    ffn.push_back(f);
  }

  // The main layers (or MTP's block) on T new tokens of one sequence at positions pos .. pos + T - 1:
  // x [T, D] (not modified), cos / sin [T, P] at those positions; the sequence's cache rows are
  // addressed by its block table (position j at pool row table[j / block] * block + j % block) and
  // the new tokens' rows are written here. Layer by layer; within a layer every matrix is read once
  // for all T tokens (speculative verification), the new rows are written before any token
  // attends, and token t attends over positions 0 .. pos + t: causal.
  // Returns the output [T, D] and, per MoE layer, its tokens per expert [E] (MoE.last_counts).
  std::tuple<torch::Tensor, std::vector<torch::Tensor>> forward(const torch::Tensor& x_in, const torch::Tensor& cos,
                                                                const torch::Tensor& sin,
                                                                const std::vector<int64_t>& table, int64_t block,
                                                                int64_t pos) {
    TORCH_CHECK(attn.size() == ffn.size() && !attn.empty(), "no layers");
    TORCH_CHECK(x_in.scalar_type() == torch::kFloat32 && x_in.dim() == 2 && x_in.size(1) == D(),
                "x: expected float32 [T, ", D(), "], got ", x_in.sizes());
    const int64_t T = x_in.size(0);
    TORCH_CHECK(T > 0 && cos.dim() == 2 && cos.size(0) == T && cos.size(1) == P && sin.sizes() == cos.sizes(),
                "cos, sin: expected [", T, ", ", P, "]");
    TORCH_CHECK(block > 0 && pos >= 0 && static_cast<int64_t>(table.size()) * block >= pos + T,
                "table: ", table.size(), " blocks of ", block, " do not hold positions up to ", pos + T - 1);
    const int64_t slots = attn[0].pool.size(0);
    rows_.resize(pos + T);
    for (int64_t j = 0; j < pos + T; ++j) {
      rows_[j] = table[j / block] * block + j % block;
      TORCH_CHECK(rows_[j] >= 0 && rows_[j] < slots, "table: block ", table[j / block], " outside the pool");
    }
    torch::Tensor x = x_in.contiguous().clone();
    const auto c = cos.contiguous(), s = sin.contiguous();
    std::vector<torch::Tensor> counts;
    for (size_t l = 0; l < attn.size(); ++l) {
      attention(x.data_ptr<float>(), T, attn[l], c.data_ptr<float>(), s.data_ptr<float>(), pos);
      if (ffn[l].E == 0) {
        feed_forward(x.data_ptr<float>(), T, ffn[l], nullptr);
      } else {
        counts.push_back(torch::zeros({ffn[l].E}, torch::kLong));
        feed_forward(x.data_ptr<float>(), T, ffn[l], counts.back().data_ptr<int64_t>());
      }
    }
    return {x, counts};
  }

 private:
  int64_t H, R, P;
  bool stream_, wide_;
  torch::Tensor head_;
  Packed p_head_;
  std::vector<Attn> attn;
  std::vector<Ffn> ffn;
  std::vector<float> xn, xg, a, q, qc, ql, scores, o, v, h;
  std::vector<int64_t> rows_;  // pool row of each position of the current sequence

  int64_t D() const { return attn.empty() ? 0 : attn[0].w_in.size(0); }

  static float* grow(std::vector<float>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
    return v.data();
  }

  // row pointers base + t * stride for t < T
  static std::vector<float*> at(float* base, int64_t T, int64_t stride) {
    std::vector<float*> p(T);
    for (int64_t t = 0; t < T; ++t) p[t] = base + t * stride;
    return p;
  }

  static const float* const* in(const std::vector<float*>& p) { return p.data(); }

  // xn[t] = x[t] / rms(x[t]) for T rows of D
  static void normalise(const float* x, float* out, int64_t T, int64_t D, double eps) {
    for (int64_t t = 0; t < T; ++t) {
      const float r = inv_rms(x + t * D, D, eps);
      for (int64_t i = 0; i < D; ++i) out[t * D + i] = x[t * D + i] * r;
    }
  }

  // row t's first n values of x (rows ld apart) times g, for T rows
  static void scale_columns(float* x, int64_t T, int64_t n, int64_t ld, const float* g) {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < n; ++i) x[t * ld + i] *= g[i];
  }

  // x[t] += o_proj(MLA(norm(x[t]))), writing the new cache rows (step.py FastDecoder._attention).
  // Absorbed MLA: scores against the cached latents [c_kv | k_pe], so without folds the query's
  // nope part goes through W_UK first (per head) and the latent output through W_UV after.
  void attention(float* x, int64_t T, const Attn& w, const float* cos, const float* sin, int64_t pos) {
    const int64_t Dm = D(), C = w.w_in.size(1), Qw = w.Qn + 2 * P, S = pos + T;
    float* xnp = grow(xn, T * Dm);
    float* ap = grow(a, T * C);
    float* qp = grow(q, T * H * Qw);
    float* op = grow(o, T * H * R);
    float* sp = grow(scores, T * H * S);
    normalise(x, xnp, T, Dm, w.norm_eps);
    if (w.norm_w.defined()) scale_columns(xnp, T, Dm, Dm, w.norm_w.data_ptr<float>());
    auto arows = at(ap, T, C);
    product(in(at(xnp, T, Dm)), T, w.w_in, w.p_in, arows.data(), 1.f, false);  // q_a | c_kv | k_pe | rot(k_pe) [| q]
    // the query per head, q_lat | q_pe (w_q's columns, or w_in's last ones without q_lora), spread out
    // into q as q_lat | q_pe | rot(q_pe), rot(q_pe) = q_pe's pairs (x0, x1) -> (-x1, x0)
    const int64_t Qc = w.Qn + P;
    const float* src = ap + R + 2 * P;
    int64_t ld = C;
    if (w.q_rank) {
      for (int64_t t = 0; t < T; ++t) {  // a[t, :q_rank] is not read again
        const float rq = inv_rms(ap + t * C, w.q_rank, w.q_eps);
        for (int64_t i = 0; i < w.q_rank; ++i) ap[t * C + i] *= rq;
      }
      if (w.q_norm_w.defined()) scale_columns(ap, T, w.q_rank, C, w.q_norm_w.data_ptr<float>());
      float* cp = grow(qc, T * H * Qc);
      auto crows = at(cp, T, H * Qc);
      product(in(arows), T, w.w_q, w.p_q, crows.data(), 1.f, false);
      src = cp, ld = H * Qc;
    }
    const float sc = w.q_scale;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t hd = 0; hd < H; ++hd) {
        const float* sh = src + t * ld + hd * Qc;
        float* dst = qp + (t * H + hd) * Qw;
        for (int64_t i = 0; i < Qc; ++i) dst[i] = sh[i] * sc;
        for (int64_t i = 0; i < P; i += 2) {
          dst[Qc + i] = -dst[w.Qn + i + 1];
          dst[Qc + i + 1] = dst[w.Qn + i];
        }
      }
    // the attention output fed to o_proj: the latent [T, H * R], or values [T, H * V] through W_UV
    float* vp = w.pool.scalar_type() == torch::kBFloat16
                          ? attend(reinterpret_cast<uint16_t*>(w.pool.data_ptr()), T, w, ap, qp, op, sp, cos, sin, pos)
                          : attend(w.pool.data_ptr<float>(), T, w, ap, qp, op, sp, cos, sin, pos);
    auto xrows = at(x, T, Dm);
    product(in(at(vp, T, H * w.Vo)), T, w.w_o, w.p_o, xrows.data(), 1.f, true);  // residual + o_proj
  }

  // attention's cache part, over a pool of FP32 or BF16 rows (Pool: float or uint16_t; BF16 rows are
  // rounded once when written and widened exactly when read, the arithmetic FP32): the new rows,
  // the query per head as a cache row, softmax over the positions, the latent output (through
  // W_UV into v where not folded), returned
  template <typename Pool>
  float* attend(Pool* pool, int64_t T, const Attn& w, float* ap, float* qp, float* op, float* sp, const float* cos,
              const float* sin, int64_t pos) {
    const int64_t C = w.w_in.size(1), W = R + P, Qn = w.Qn, Qw = Qn + 2 * P, S = pos + T;
    const float* g = w.kv_norm.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t) {  // the new rows: kv_a_layernorm(c_kv) | rope(k_pe)
      const float* kv = ap + t * C + w.q_rank;
      const float *ct = cos + t * P, *st = sin + t * P;
      Pool* row_out = pool + rows_[pos + t] * W;
      const float rk = inv_rms(kv, R, w.kv_eps);
      for (int64_t i = 0; i < R; ++i) store(row_out + i, kv[i] * rk * g[i]);
      for (int64_t i = 0; i < P; ++i) store(row_out + R + i, kv[R + i] * ct[i] + kv[R + P + i] * st[i]);
    }
    // per (token, head) query as a cache row [q_lat (R) | rope(q_pe) (P)]: in q itself when W_UK is
    // folded (q_lat | q_pe | rot(q_pe)), else in ql (q_lat = q_nope @ W_UK[h])
    float* qlp = w.w_uk.defined() ? grow(ql, T * H * W) : qp;
    const int64_t qs = w.w_uk.defined() ? W : Qw;
    float* vp = w.w_uv.defined() ? grow(v, T * H * w.Vo) : op;
    at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
      for (int64_t hd = h0; hd < h1; ++hd) {
        for (int64_t t = 0; t < T; ++t) {
          float* qh = qp + (t * H + hd) * Qw;
          const float *ct = cos + t * P, *st = sin + t * P;
          float* dst = qlp + (t * H + hd) * qs + R;
          for (int64_t i = 0; i < P; ++i) dst[i] = qh[Qn + i] * ct[i] + qh[Qn + P + i] * st[i];
        }
        if (w.w_uk.defined()) {  // T rows of this head through its W_UK [N, R]: one read of it
          std::vector<const float*> xs(T);
          std::vector<float*> ys(T);
          for (int64_t t = 0; t < T; ++t) {
            xs[t] = qp + (t * H + hd) * Qw;
            ys[t] = qlp + (t * H + hd) * W;
          }
          product(xs.data(), T, w.w_uk, w.p_uk, ys.data(), 1.f, false, hd, true);
        }
      }
      for (int64_t t = 0; t < T; ++t) {  // this thread's heads in groups, each cache row read once per group
        const int64_t St = pos + t + 1;  // causal: this token and those before it
        for (int64_t g = h0; g < h1; g += kScoreHeads) {
          const int64_t G = std::min(kScoreHeads, h1 - g);
          const float* qs_[kScoreHeads];
          float* sc_[kScoreHeads];
          float* oh_[kScoreHeads];
          for (int64_t i = 0; i < G; ++i) {
            qs_[i] = qlp + (t * H + g + i) * qs;
            sc_[i] = sp + (t * H + g + i) * S;
            oh_[i] = op + (t * H + g + i) * R;
          }
          for (int64_t j = 0; j < St; ++j) group_dots(G, qs_, pool + rows_[j] * W, W, sc_, j);
          for (int64_t i = 0; i < G; ++i) {  // softmax: sc becomes the probabilities
            float* sc = sc_[i];
            float mx = -INFINITY, sum = 0.f;
            for (int64_t j = 0; j < St; ++j) mx = std::max(mx, sc[j]);
            for (int64_t j = 0; j < St; ++j) sum += sc[j] = std::exp(sc[j] - mx);
            for (int64_t j = 0; j < St; ++j) sc[j] = sc[j] / sum;
          }
          for (int64_t i = 0; i < G; i += kSumHeads)
            group_sums(std::min(kSumHeads, G - i), sc_ + i, pool, rows_.data(), W, St, R, oh_ + i);
        }
      }
      for (int64_t hd = h0; hd < h1; ++hd) {
        if (w.w_uv.defined()) {  // T rows of this head through its W_UV [R, V]
          std::vector<const float*> xs(T);
          std::vector<float*> ys(T);
          for (int64_t t = 0; t < T; ++t) {
            xs[t] = op + (t * H + hd) * R;
            ys[t] = vp + (t * H + hd) * w.Vo;
          }
          product(xs.data(), T, w.w_uv, w.p_uv, ys.data(), 1.f, false, hd, true);
        }
      }
    });
    return vp;
  }

  // x[t] += FFN(norm(x[t])): dense MLP, or shared + routed experts (decode.py FastDecoder._ffn)
  void feed_forward(float* x, int64_t T, const Ffn& w, int64_t* counts) {
    const int64_t Dm = D(), Ef = w.fused_gate ? w.E : 0;
    float* xnp = grow(xn, T * Dm);  // xn (the gate reads it) and xg = xn * norm_w (the other matrices)
    float* xgp = grow(xg, T * Dm);
    normalise(x, xnp, T, Dm, w.norm_eps);
    const float* ng = w.norm_w.defined() ? w.norm_w.data_ptr<float>() : nullptr;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < Dm; ++i) xgp[t * Dm + i] = ng ? xnp[t * Dm + i] * ng[i] : xnp[t * Dm + i];
    auto xgrows = at(xgp, T, Dm);
    auto xrows = at(x, T, Dm);
    const int64_t C = w.w_in.defined() ? w.w_in.size(1) : 0;
    float* ap = grow(a, T * C);
    if (C) {
      auto arows = at(ap, T, C);
      product(in(xgrows), T, w.w_in, w.p_in, arows.data(), 1.f, false);  // gate logits | shared gate | shared up
    }
    if (w.hidden) {
      float* hp = grow(h, T * w.hidden);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t i = 0; i < w.hidden; ++i)
          hp[t * w.hidden + i] = silu(ap[t * C + Ef + i]) * ap[t * C + Ef + w.hidden + i];
      product(in(at(hp, T, w.hidden)), T, w.w_down, w.p_down, xrows.data(), 1.f, true);
    }
    if (w.E == 0) return;
    float* lp = grow(scores, T * w.E);  // gate logits per token
    if (w.fused_gate) {
      for (int64_t t = 0; t < T; ++t) std::copy(ap + t * C, ap + t * C + w.E, lp + t * w.E);
    } else {
      auto lrows = at(lp, T, w.E);
      product(in(at(xnp, T, Dm)), T, w.gate_w, w.p_gate, lrows.data(), 1.f, false);
    }
    std::vector<int64_t> ids(T * w.top_k);  // route every token, then run the experts grouped
    std::vector<double> gates(T * w.top_k);
    for (int64_t tk = 0; tk < T; ++tk) {
      std::vector<int64_t> chosen;
      std::vector<double> g;
      route(w, lp + tk * w.E, chosen, g);
      std::copy(chosen.begin(), chosen.end(), ids.begin() + tk * w.top_k);
      std::copy(g.begin(), g.end(), gates.begin() + tk * w.top_k);
      for (int64_t e : chosen) ++counts[e];
    }
    experts_rows(xrows.data(), in(xgrows), T, w.w13, w.w2, ids.data(), gates.data(), w.top_k, w.p13, w.p2);
  }

  // dsv3.model.moe.route on one token's logits: the same order of operations and the same ties (lower id first)
  static void route(const Ffn& w, const float* logits, std::vector<int64_t>& ids, std::vector<double>& gates) {
    const int64_t E = w.E;
    std::vector<float> s(E), c(E);
    if (w.sigmoid) {
      for (int64_t e = 0; e < E; ++e) s[e] = 1.f / (1.f + std::exp(-logits[e]));
    } else {
      float mx = -INFINITY, sum = 0.f;
      for (int64_t e = 0; e < E; ++e) mx = std::max(mx, logits[e]);
      for (int64_t e = 0; e < E; ++e) sum += s[e] = std::exp(logits[e] - mx);
      for (int64_t e = 0; e < E; ++e) s[e] /= sum;
    }
    const float* b = w.bias.data_ptr<float>();
    for (int64_t e = 0; e < E; ++e) c[e] = s[e] + b[e];  // s' = s + bias chooses, s weighs
    std::vector<int64_t> cand;
    if (w.n_groups > 1) {  // a group's score is the sum of its top-2 s'; keep the best groups
      const int64_t per = E / w.n_groups;
      std::vector<double> group(w.n_groups);
      for (int64_t g = 0; g < w.n_groups; ++g) {
        std::vector<float> v(c.begin() + g * per, c.begin() + (g + 1) * per);
        std::sort(v.begin(), v.end());
        group[g] = per > 1 ? static_cast<double>(v[per - 2]) + static_cast<double>(v[per - 1]) : v[0];
      }
      std::vector<int64_t> order(w.n_groups);
      for (int64_t g = 0; g < w.n_groups; ++g) order[g] = g;
      std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return group[i] > group[j]; });
      for (int64_t k = 0; k < w.topk_groups; ++k)
        for (int64_t e = order[k] * per; e < (order[k] + 1) * per; ++e) cand.push_back(e);
    } else {
      for (int64_t e = 0; e < E; ++e) cand.push_back(e);
    }
    std::stable_sort(cand.begin(), cand.end(), [&](int64_t i, int64_t j) { return c[i] > c[j]; });
    ids.assign(cand.begin(), cand.begin() + w.top_k);
    double total = 0.0;
    for (int64_t e : ids) total += static_cast<double>(s[e]);
    const double scale = w.sigmoid ? w.route_scale / (total + 1e-20) : w.route_scale;
    gates.clear();
    for (int64_t e : ids) gates.push_back(static_cast<double>(s[e]) * scale);
  }
};

}  // namespace

void add_paged_attention(pybind11::module_& m);  // paged_attention.cpp
void add_amx_gemm(pybind11::module_& m);  // amx_gemm.cpp

// The compute entry points release the GIL while they run (their arguments are converted before,
// their results after): a server's event-loop thread keeps answering and streaming during a
// multi-millisecond decode step instead of waiting for it (dsv3.serve.engine_loop).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using nogil = py::call_guard<py::gil_scoped_release>;
  add_paged_attention(m);
  add_amx_gemm(m);
  m.def("mm", &mm, "x @ w (+ bias) for a few rows", py::arg("x"), py::arg("w"), py::arg("bias") = py::none(),
        nogil());
  m.def("addmm_", &addmm_, "out += alpha * x @ w, in place", nogil());
  m.def("pack_strips", &dsv3::pack_strips, "w packed in strips of 16 columns (streamed.h)", py::arg("w"));
  m.def("strips_mm", &strips_mm, "x @ a strip-packed w (+ bias)", py::arg("x"), py::arg("packed"), py::arg("n"),
        py::arg("bias") = py::none(), nogil());
  m.def("strips_bmm", &strips_bmm, "x[g] @ strip-packed w[g] per group", py::arg("x"), py::arg("packed"),
        py::arg("n"), nogil());
  m.def(
      "experts_",
      [](torch::Tensor out, const torch::Tensor& xn, const torch::Tensor& w13, const torch::Tensor& w2,
         const std::vector<int64_t>& ids, const std::vector<double>& gates) { experts_(out, xn, w13, w2, ids, gates); },
      "out += the routed experts of xn, in place", nogil());
  m.def(
      "strips_experts_",
      [](torch::Tensor out, const torch::Tensor& xn, const torch::Tensor& w13, const torch::Tensor& w2,
         const torch::Tensor& s13, const torch::Tensor& s2, const std::vector<int64_t>& ids,
         const std::vector<double>& gates) { experts_(out, xn, w13, w2, ids, gates, {}, {}, s13, s2); },
      "out += the routed experts of xn, in place, on w13's and w2's strips (pack_strips)", py::arg("out"),
      py::arg("xn"), py::arg("w13"), py::arg("w2"), py::arg("s13"), py::arg("s2"), py::arg("ids"), py::arg("gates"),
      nogil());
  py::class_<RowDecoder>(m, "RowDecoder")
      .def(py::init<int64_t, int64_t, int64_t, bool, bool>(), py::arg("heads"), py::arg("rank"), py::arg("rope"),
           py::arg("stream") = false, py::arg("wide") = false)
      .def("streamed_bytes", &RowDecoder::streamed_bytes)
      .def("set_head", &RowDecoder::set_head)
      .def("logits", &RowDecoder::logits, nogil())
      .def("heads", &RowDecoder::heads, py::arg("layer"), py::arg("uv"), py::arg("x"), nogil())
      .def("experts_", &RowDecoder::experts, py::arg("layer"), py::arg("out"), py::arg("xn"), py::arg("ids"),
           py::arg("gates"), nogil())
      .def("add_attention", &RowDecoder::add_attention)
      .def("add_ffn", &RowDecoder::add_ffn)
      .def("forward", &RowDecoder::forward, nogil());
}
