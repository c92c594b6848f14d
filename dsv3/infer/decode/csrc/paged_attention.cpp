// Absorbed-MLA attention of many rows read straight from the paged latent cache (DESIGN §3.2, §8):
// the native fast path of dsv3/infer/decode/keys.py GatheredKeys.attend, built into the same
// extension as few_rows.cpp (which registers `paged_attend` from here).
//
// For each of B rows, its T new queries (t = 0..T-1 at positions start_b + t) and H heads:
//   out[b T + t, h] = softmax_j(q[b T + t, h] . key_j) @ key_j[:R],  j = 0 .. start_b + t,
// key_j the cache row of position j: pool[table[b][j / block] * block + j % block] for j < start_b
// (read through the block table: no gather copy), new[b T + j - start_b] for the step's new rows
// (not yet in the pool). One pass over the keys with an online softmax (running max and sum per
// query, the flash-decoding recurrence), in chunks of kChunk keys: a chunk's scores for every query
// of the row, then its probabilities times the chunk's latents (the chunk still in L1 / L2). Each
// key row is read from memory once for all T * H queries of its row: B * S * W bytes per layer.
// Pool and new rows in FP32 or BF16 (widened on load, exact); q, out and all sums FP32.
//
// Threads: at::parallel_for over the rows. A query's result is computed by one thread with the
// same sequence of operations whatever the split (the chunks start at fixed positions; the
// register blocking of queries keeps one accumulator per query), so it does not depend on the
// thread count.
//
// Shapes: B rows, T new tokens per row, H heads, R kv_lora_rank, W = R + P cache width,
// S_b = start_b + T key positions of row b, Q = T * H queries per row.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <immintrin.h>

#include "widen.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kChunk = 16;  // keys per online-softmax step: 16 x 576 FP32 = 36 KB (L1)

using dsv3::load1;
using dsv3::load8;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// s[i * K + u] = q_i . key_u (W wide) for N <= 4 queries against K <= 2 key rows, each key vector
// loaded once for all N queries and each query vector once for the K keys; per (query, key) the same
// operations whatever N and K (one accumulator each), so the blocking does not change a result
template <int N, int K, typename T>
inline void dots(const float* const* q, const T* const* k, int64_t W, float* const* s) {
  __m256 acc[N][K];
  for (int i = 0; i < N; ++i)
    for (int u = 0; u < K; ++u) acc[i][u] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= W; c += 8) {
    __m256 kv[K];
    for (int u = 0; u < K; ++u) kv[u] = load8(k[u] + c);
    for (int i = 0; i < N; ++i) {
      const __m256 qv = _mm256_loadu_ps(q[i] + c);
      for (int u = 0; u < K; ++u) acc[i][u] = _mm256_fmadd_ps(qv, kv[u], acc[i][u]);
    }
  }
  for (int i = 0; i < N; ++i)
    for (int u = 0; u < K; ++u) {
      float r = hsum(acc[i][u]);
      for (int64_t cc = c; cc < W; ++cc) r += q[i][cc] * load1(k[u] + cc);
      *s[i * K + u] = r;
    }
}

// dots<4, 2> with its eight accumulators as named variables: the array form is written back to the
// stack on every step by GCC (8 stores per 8 FMAs, seen in perf annotate); the same operations per
// (query, key) as the template
template <typename T>
inline void dots42(const float* const* q, const T* const* k, int64_t W, float* const* s) {
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
  const float *q0 = q[0], *q1 = q[1], *q2 = q[2], *q3 = q[3];
  const T *k0 = k[0], *k1 = k[1];
  int64_t c = 0;
  for (; c + 8 <= W; c += 8) {
    const __m256 u = load8(k0 + c), v = load8(k1 + c);
    __m256 x = _mm256_loadu_ps(q0 + c);
    a00 = _mm256_fmadd_ps(x, u, a00);
    a01 = _mm256_fmadd_ps(x, v, a01);
    x = _mm256_loadu_ps(q1 + c);
    a10 = _mm256_fmadd_ps(x, u, a10);
    a11 = _mm256_fmadd_ps(x, v, a11);
    x = _mm256_loadu_ps(q2 + c);
    a20 = _mm256_fmadd_ps(x, u, a20);
    a21 = _mm256_fmadd_ps(x, v, a21);
    x = _mm256_loadu_ps(q3 + c);
    a30 = _mm256_fmadd_ps(x, u, a30);
    a31 = _mm256_fmadd_ps(x, v, a31);
  }
  const __m256 acc[8] = {a00, a01, a10, a11, a20, a21, a30, a31};
  for (int i = 0; i < 4; ++i)
    for (int u = 0; u < 2; ++u) {
      float r = hsum(acc[i * 2 + u]);
      for (int64_t cc = c; cc < W; ++cc) r += q[i][cc] * load1(k[u] + cc);
      *s[i * 2 + u] = r;
    }
}

// the scores of queries i0 .. Q-1 against K key rows (chunk columns j .. j + K - 1), 4 queries at a time
template <int K, typename T>
inline void score_keys(const float* const* q, int64_t i0, int64_t Q, const T* const* k, int64_t W, float* sc,
                       int64_t j) {
  float* o[4 * K];
  int64_t i = i0;
  for (; i + 4 <= Q; i += 4) {
    for (int a = 0; a < 4; ++a)
      for (int u = 0; u < K; ++u) o[a * K + u] = sc + (i + a) * kChunk + j + u;
    if constexpr (K == 2)
      dots42(q + i, k, W, o);
    else
      dots<4, K>(q + i, k, W, o);
  }
  for (; i < Q; ++i) {
    for (int u = 0; u < K; ++u) o[u] = sc + i * kChunk + j + u;
    dots<1, K>(q + i, k, W, o);
  }
}

// exp(x) for 8 lanes (Cephes' range reduction and degree-5 polynomial: within ~2 ulp of exp for
// x >= -87.3; below that, -inf included, exactly 0)
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f), hi = _mm256_set1_ps(88.37626f);
  const __m256 tiny = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, x), x, x), _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

// o_i[0:R] = o_i * scale_i + sum_j p_i[j] k_j[0:R] over n keys, for N <= 2 queries: 32 columns at a
// time in registers, each key tile loaded once for both queries
template <int N, typename T>
inline void accumulate(float* const* o, const float* scale, const float* const* p, const T* const* k, int64_t n,
                       int64_t R) {
  int64_t c = 0;
  for (; c + 32 <= R; c += 32) {
    __m256 a[N][4];
    for (int i = 0; i < N; ++i) {
      const __m256 sc = _mm256_set1_ps(scale[i]);
      for (int v = 0; v < 4; ++v) a[i][v] = _mm256_mul_ps(_mm256_loadu_ps(o[i] + c + 8 * v), sc);
    }
    for (int64_t j = 0; j < n; ++j) {
      const __m256 k0 = load8(k[j] + c), k1 = load8(k[j] + c + 8), k2 = load8(k[j] + c + 16),
                   k3 = load8(k[j] + c + 24);
      for (int i = 0; i < N; ++i) {
        const __m256 pj = _mm256_set1_ps(p[i][j]);
        a[i][0] = _mm256_fmadd_ps(pj, k0, a[i][0]);
        a[i][1] = _mm256_fmadd_ps(pj, k1, a[i][1]);
        a[i][2] = _mm256_fmadd_ps(pj, k2, a[i][2]);
        a[i][3] = _mm256_fmadd_ps(pj, k3, a[i][3]);
      }
    }
    for (int i = 0; i < N; ++i)
      for (int v = 0; v < 4; ++v) _mm256_storeu_ps(o[i] + c + 8 * v, a[i][v]);
  }
  for (; c < R; ++c)
    for (int i = 0; i < N; ++i) {
      float a = o[i][c] * scale[i];
      for (int64_t j = 0; j < n; ++j) a += p[i][j] * load1(k[j] + c);
      o[i][c] = a;
    }
}

// one row b: its Q = T * H queries over its S = start + T keys
template <typename T>
void attend_row(const float* q, int64_t qs0, int64_t qs1, const T* pool, const T* fresh, const int64_t* table,
                int64_t block, int64_t start, int64_t Tn, int64_t H, int64_t W, int64_t R, float* out,
                std::vector<float>& work) {
  const int64_t Q = Tn * H, S = start + Tn;
  work.resize(Q * (kChunk + 2));
  float *sc = work.data(), *mx = sc + Q * kChunk, *sum = mx + Q;  // scores / probabilities per chunk
  std::fill(mx, mx + Q, -INFINITY);
  std::fill(sum, sum + Q, 0.f);
  std::fill(out, out + Q * R, 0.f);
  std::vector<const float*> qp(Q);
  std::vector<float*> op(Q);
  for (int64_t t = 0; t < Tn; ++t)
    for (int64_t h = 0; h < H; ++h) {
      qp[t * H + h] = q + t * qs0 + h * qs1;
      op[t * H + h] = out + (t * H + h) * R;
    }
  const T* keys[kChunk];
  float scale[2];
  auto key = [&](int64_t pos) {
    return pos < start ? pool + (table[pos / block] * block + pos % block) * W : fresh + (pos - start) * W;
  };
  for (int64_t j0 = 0; j0 < S; j0 += kChunk) {
    const int64_t n = std::min(kChunk, S - j0);
    for (int64_t j = 0; j < n; ++j) keys[j] = key(j0 + j);
    // the next chunk's keys into the cache while this one computes, one row per key scored (the
    // rows of scattered blocks: the hardware prefetcher starts over at every block, and a burst of
    // a whole chunk's lines at once overflows the miss buffers)
    const int64_t ahead = std::max<int64_t>(0, std::min(kChunk, S - j0 - kChunk));
    auto fetch = [&](int64_t j) {
      if (j >= ahead) return;
      const char* r = reinterpret_cast<const char*>(key(j0 + kChunk + j));
      for (int64_t b = 0; b < W * static_cast<int64_t>(sizeof(T)); b += 64) _mm_prefetch(r + b, _MM_HINT_T1);
    };
    // scores: key j against every query that sees it (query t sees positions <= start + t); two
    // cached keys at a time (every query sees them), the new ones one by one
    int64_t j = 0;
    for (; j + 2 <= n && j0 + j + 1 < start; j += 2) {
      fetch(j);
      fetch(j + 1);
      score_keys<2>(qp.data(), 0, Q, keys + j, W, sc, j);
    }
    for (; j < n; ++j) {
      fetch(j);
      const int64_t t0 = std::max<int64_t>(0, j0 + j - start);  // the first token that sees it
      for (int64_t i = 0; i < t0 * H; ++i) sc[i * kChunk + j] = -INFINITY;
      score_keys<1>(qp.data(), t0 * H, Q, keys + j, W, sc, j);
    }
    // the online softmax step, then probabilities x latents, two queries at a time
    const int64_t n8 = (n + 7) & ~int64_t{7};
    for (int64_t i = 0; i < Q; i += 2) {
      const int nq = std::min<int64_t>(2, Q - i);
      const float* pr[2];
      float* o2[2];
      for (int u = 0; u < nq; ++u) {
        float* s = sc + (i + u) * kChunk;
        std::fill(s + n, s + n8, -INFINITY);
        float m = mx[i + u];
        for (int64_t c = 0; c < n; ++c) m = std::max(m, s[c]);
        if (m == -INFINITY) {  // no key of this chunk visible yet: nothing changes
          scale[u] = 1.f;
          std::fill(s, s + n, 0.f);
        } else {
          scale[u] = std::exp(mx[i + u] - m);  // 0 on the first chunk (mx = -inf)
          const __m256 mv = _mm256_set1_ps(m);
          for (int64_t c = 0; c < n8; c += 8) _mm256_storeu_ps(s + c, exp8(_mm256_sub_ps(_mm256_loadu_ps(s + c), mv)));
          float add = 0.f;
          for (int64_t c = 0; c < n; ++c) add += s[c];
          sum[i + u] = sum[i + u] * scale[u] + add;
          mx[i + u] = m;
        }
        pr[u] = s;
        o2[u] = op[i + u];
      }
      if (nq == 2)
        accumulate<2>(o2, scale, pr, keys, n, R);
      else
        accumulate<1>(o2, scale, pr, keys, n, R);
    }
  }
  for (int64_t i = 0; i < Q; ++i) {
    const float inv = 1.f / sum[i];
    for (int64_t c = 0; c < R; ++c) op[i][c] *= inv;
  }
}

template <typename T>
void attend_rows(const torch::Tensor& q, const torch::Tensor& pool, const torch::Tensor& fresh,
                 const torch::Tensor& table, int64_t block, const std::vector<int64_t>& starts, int64_t Tn,
                 int64_t R, torch::Tensor& out) {
  const int64_t B = starts.size(), H = q.size(1), W = q.size(2), bw = table.size(1);
  const T* pp = reinterpret_cast<const T*>(pool.data_ptr());
  const T* fp = reinterpret_cast<const T*>(fresh.data_ptr());
  const int64_t* tp = table.data_ptr<int64_t>();
  const float* qp = q.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> work;
    for (int64_t b = b0; b < b1; ++b)
      attend_row<T>(qp + b * Tn * q.stride(0), q.stride(0), q.stride(1), pp, fp + b * Tn * W, tp + b * bw, block,
                    starts[b], Tn, H, W, R, o + b * Tn * H * R, work);
  });
}

// q [B*T, H, W] FP32 (unit last stride; the softmax scale folded in), pool [slots, W] and new
// [B*T, W] (FP32 or BF16, one dtype), table [B, blocks] int64, starts [B] -> out [B*T, H, R] FP32
torch::Tensor paged_attend(const torch::Tensor& q, const torch::Tensor& pool, const torch::Tensor& fresh,
                           const torch::Tensor& table, int64_t block, const std::vector<int64_t>& starts,
                           int64_t R) {
  const int64_t B = starts.size();
  TORCH_CHECK(B > 0, "starts: expected at least one row");
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32 && q.stride(2) == 1,
              "q: expected float32 [B*T, H, W] with unit last stride, got ", q.scalar_type(), " ", q.sizes());
  TORCH_CHECK(q.size(0) % B == 0, "q: ", q.size(0), " query rows for ", B, " rows");
  const int64_t Tn = q.size(0) / B, H = q.size(1), W = q.size(2);
  TORCH_CHECK(pool.dim() == 2 && pool.is_contiguous() && pool.size(1) == W,
              "pool: expected contiguous [slots, ", W, "], got ", pool.sizes());
  TORCH_CHECK(pool.scalar_type() == torch::kFloat32 || pool.scalar_type() == torch::kBFloat16,
              "pool: expected float32 or bfloat16, got ", pool.scalar_type());
  TORCH_CHECK(fresh.dim() == 2 && fresh.is_contiguous() && fresh.size(0) == B * Tn && fresh.size(1) == W &&
                  fresh.scalar_type() == pool.scalar_type(),
              "new: expected contiguous [", B * Tn, ", ", W, "] in the pool's dtype, got ", fresh.sizes());
  TORCH_CHECK(table.dim() == 2 && table.is_contiguous() && table.scalar_type() == torch::kInt64 &&
                  table.size(0) == B,
              "table: expected contiguous int64 [", B, ", blocks], got ", table.sizes());
  TORCH_CHECK(R > 0 && R <= W, "rank: ", R, " outside (0, ", W, "]");
  TORCH_CHECK(block > 0, "block: expected > 0, got ", block);
  const int64_t slots = pool.size(0), bw = table.size(1);
  const int64_t* tp = table.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t s = starts[b];
    TORCH_CHECK(s >= 0 && (s == 0 || (s - 1) / block < bw), "starts: row ", b, " at ", s, " beyond its ", bw,
                " blocks of ", block);
    for (int64_t k = 0; k * block < s; ++k)
      TORCH_CHECK(tp[b * bw + k] >= 0 && (tp[b * bw + k] + 1) * block <= slots, "table: row ", b, " block ",
                  tp[b * bw + k], " outside the pool");
  }
  auto out = torch::empty({B * Tn, H, R}, q.options());
  if (pool.scalar_type() == torch::kBFloat16)
    attend_rows<uint16_t>(q, pool, fresh, table, block, starts, Tn, R, out);
  else
    attend_rows<float>(q, pool, fresh, table, block, starts, Tn, R, out);
  return out;
}

}  // namespace

void add_paged_attention(pybind11::module_& m) {
  m.def("paged_attend", &paged_attend,
        "softmax(q . keys) @ keys[:, :R] per row, the keys read through the block table, causal among new rows",
        py::arg("q"), py::arg("pool"), py::arg("new"), py::arg("table"), py::arg("block"), py::arg("starts"),
        py::arg("rank"), pybind11::call_guard<pybind11::gil_scoped_release>());  // as few_rows.cpp's
}
