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
// Two widths of one source (attend_impl.h): AVX2's 8 lanes, and AVX-512's 16 (`wide`, chosen by the
// caller where the CPU has AVX-512F: twice the FMAs per instruction, for a loop that is bound by them).
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


namespace avx2 {  // 8 FP32 lanes (the file's flags)
using V = __m256;
constexpr int64_t kLanes = 8;
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline V vload(const uint16_t* p) { return dsv3::load8(p); }
inline V vzero() { return _mm256_setzero_ps(); }
inline V vset1(float x) { return _mm256_set1_ps(x); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
inline float vsum(V v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}
#include "attend_impl.h"
}  // namespace avx2

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {  // 16 FP32 lanes: compiled for AVX-512F, run only where the CPU has it (`wide`)
using V = __m512;
constexpr int64_t kLanes = 16;
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline V vload(const uint16_t* p) {  // 16 BF16 -> 16 FP32: the BF16 bits are the high half
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline V vzero() { return _mm512_setzero_ps(); }
inline V vset1(float x) { return _mm512_set1_ps(x); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
inline float vsum(V v) { return _mm512_reduce_add_ps(v); }
#include "attend_impl.h"
}  // namespace avx512
#pragma GCC pop_options

template <typename T>
void attend_rows(const torch::Tensor& q, const torch::Tensor& pool, const torch::Tensor& fresh,
                 const torch::Tensor& table, int64_t block, const std::vector<int64_t>& starts, int64_t Tn,
                 int64_t R, bool wide, torch::Tensor& out) {
  const int64_t B = starts.size(), H = q.size(1), W = q.size(2), bw = table.size(1);
  const T* pp = reinterpret_cast<const T*>(pool.data_ptr());
  const T* fp = reinterpret_cast<const T*>(fresh.data_ptr());
  const int64_t* tp = table.data_ptr<int64_t>();
  const float* qp = q.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> work;
    for (int64_t b = b0; b < b1; ++b)
      (wide ? avx512::attend_row<T> : avx2::attend_row<T>)(qp + b * Tn * q.stride(0), q.stride(0), q.stride(1), pp,
                                                           fp + b * Tn * W, tp + b * bw, block, starts[b], Tn, H,
                                                           W, R, o + b * Tn * H * R, work);
  });
}

// q [B*T, H, W] FP32 (unit last stride; the softmax scale folded in), pool [slots, W] and new
// [B*T, W] (FP32 or BF16, one dtype), table [B, blocks] int64, starts [B] -> out [B*T, H, R] FP32
torch::Tensor paged_attend(const torch::Tensor& q, const torch::Tensor& pool, const torch::Tensor& fresh,
                           const torch::Tensor& table, int64_t block, const std::vector<int64_t>& starts,
                           int64_t R, bool wide) {
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
  TORCH_CHECK(!wide || __builtin_cpu_supports("avx512f"), "wide: this CPU lacks AVX-512F");
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
    attend_rows<uint16_t>(q, pool, fresh, table, block, starts, Tn, R, wide, out);
  else
    attend_rows<float>(q, pool, fresh, table, block, starts, Tn, R, wide, out);
  return out;
}

}  // namespace

void add_paged_attention(pybind11::module_& m) {
  m.def("paged_attend", &paged_attend,
        "softmax(q . keys) @ keys[:, :R] per row, the keys read through the block table, causal among new rows",
        py::arg("q"), py::arg("pool"), py::arg("new"), py::arg("table"), py::arg("block"), py::arg("starts"),
        py::arg("rank"), py::arg("wide") = false, pybind11::call_guard<pybind11::gil_scoped_release>());  // as few_rows.cpp's
}
