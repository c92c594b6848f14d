// Weights packed for streaming: the one-row decoder's matrices (few_rows.cpp RowDecoder) on CPUs
// with AVX-512F.
//
// A lone token reads every matrix once, so a step's time is its bytes over the memory bandwidth
// one core draws. On the row-major [K, N] layout the few-row loop (few_rows.cpp `block`) reads four
// weight rows at a time, four streams a few KB apart, and keeps the sums in L1: measured on the AMD
// EPYC (Zen 4, 1 thread, weights out of cache) it streams BF16 at 10-16 GB/s where a plain read of
// the same bytes runs at 21-25 GB/s: the memory waits and the arithmetic do not overlap.
// Packed, each run of 64 output columns (a panel) is one contiguous [K, 64] slab read front to
// back, its 64 sums per row in four AVX-512 registers: 21-28 GB/s on the same matrices (e.g.
// [2048, 512] 200 -> 74 us, [1536, 2048] 435 -> 300 us).
//
// Layout: [count, panels, K, 64], panels = ceil(N / 64), the columns past N zero. FP32 weights in
// column order. BF16 weights with each 32-column half of a panel row as 16 dwords, dword i holding
// column i in its low half and column 16 + i in its high half: a shift and a mask widen them to
// FP32 (exactly), no shuffle.
//
// Arithmetic: out[n] = fma chain over k = 0 .. K-1 in order, then (acc ? out + alpha * s : alpha *
// s): the order of `block`'s vector columns, whatever the thread split (threads take whole panels).
#pragma once

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace dsv3 {

constexpr int64_t kPanelCols = 64;

struct Packed {
  torch::Tensor data;  // [count, panels, K, 64]: float32, or BF16 bits (interleaved as above) in an int16 tensor
  int64_t K = 0, N = 0, panels = 0;
  bool bf16 = false;

  bool defined() const { return data.defined(); }
  int64_t matrix_size() const { return panels * K * kPanelCols; }
};

// w [K, N] (unit column stride, any row stride) or a contiguous [count, K, N], FP32 or BF16
inline Packed pack(const torch::Tensor& w) {
  TORCH_CHECK((w.dim() == 2 && w.stride(1) == 1) || (w.dim() == 3 && w.is_contiguous()),
              "pack: expected [K, N] with unit column stride or a contiguous [count, K, N], got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 || w.scalar_type() == torch::kBFloat16,
              "pack: expected float32 or bfloat16, got ", w.scalar_type());
  Packed p;
  p.K = w.size(-2);
  p.N = w.size(-1);
  p.panels = (p.N + kPanelCols - 1) / kPanelCols;
  p.bf16 = w.scalar_type() == torch::kBFloat16;
  const int64_t count = w.dim() == 3 ? w.size(0) : 1, ld = w.stride(-2), K = p.K, N = p.N;
  p.data = torch::zeros({count, p.panels, K, kPanelCols}, p.bf16 ? torch::kInt16 : torch::kFloat32);
  at::parallel_for(0, count * p.panels, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t eb = b0; eb < b1; ++eb) {
      const int64_t e = eb / p.panels, c0 = (eb % p.panels) * kPanelCols, nw = std::min(kPanelCols, N - c0);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t src = e * K * N + k * ld + c0, dst = (eb * K + k) * kPanelCols;
        if (p.bf16) {
          const auto* s = reinterpret_cast<const uint16_t*>(w.data_ptr()) + src;
          auto* d = reinterpret_cast<uint16_t*>(p.data.data_ptr()) + dst;
          for (int64_t j = 0; j < nw; ++j) {  // column j of the panel: half h, lane i, high half or low
            const int64_t h = j / 32, r = j % 32;
            d[h * 32 + 2 * (r % 16) + r / 16] = s[j];
          }
        } else {
          std::memcpy(p.data.data_ptr<float>() + dst, w.data_ptr<float>() + src, nw * sizeof(float));
        }
      }
    }
  });
  return p;
}

// panels b0 .. b1 - 1 of matrix `index` for M <= 4 rows: y[m][c] (+)= alpha * x[m] @ w[:, c]
// (every pointer read once before the loops and the sums in registers: with the tensor's data_ptr
// and the rows read per k, gcc 12 kept the sums in memory, a store and a load per FMA)
template <int M, bool BF16>
__attribute__((target("avx512f"))) void panels(const float* const* x, const Packed& p, int64_t index, float* const* y,
                                               float alpha, bool acc, int64_t b0, int64_t b1) {
  const int64_t K = p.K, N = p.N;
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  const float* xr[M];
  float* yr[M];
  for (int m = 0; m < M; ++m) xr[m] = x[m], yr[m] = y[m];
  const int64_t first = index * p.matrix_size();
  const uint16_t* wb = BF16 ? reinterpret_cast<const uint16_t*>(p.data.data_ptr()) + first : nullptr;
  const float* wf = BF16 ? nullptr : p.data.data_ptr<float>() + first;
  for (int64_t b = b0; b < b1; ++b) {
    __m512 s0[M], s1[M], s2[M], s3[M];
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) s0[m] = s1[m] = s2[m] = s3[m] = _mm512_setzero_ps();
    const int64_t off = b * K * kPanelCols;
    for (int64_t k = 0; k < K; ++k) {
      __m512 w0, w1, w2, w3;
      if constexpr (BF16) {
        const uint16_t* q = wb + off + k * kPanelCols;
        const __m512i v0 = _mm512_loadu_si512(q), v1 = _mm512_loadu_si512(q + 32);
        w0 = _mm512_castsi512_ps(_mm512_slli_epi32(v0, 16));
        w1 = _mm512_castsi512_ps(_mm512_and_si512(v0, high));
        w2 = _mm512_castsi512_ps(_mm512_slli_epi32(v1, 16));
        w3 = _mm512_castsi512_ps(_mm512_and_si512(v1, high));
      } else {
        const float* q = wf + off + k * kPanelCols;
        w0 = _mm512_loadu_ps(q), w1 = _mm512_loadu_ps(q + 16), w2 = _mm512_loadu_ps(q + 32);
        w3 = _mm512_loadu_ps(q + 48);
      }
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        const __m512 xk = _mm512_set1_ps(xr[m][k]);
        s0[m] = _mm512_fmadd_ps(xk, w0, s0[m]);
        s1[m] = _mm512_fmadd_ps(xk, w1, s1[m]);
        s2[m] = _mm512_fmadd_ps(xk, w2, s2[m]);
        s3[m] = _mm512_fmadd_ps(xk, w3, s3[m]);
      }
    }
    const int64_t c0 = b * kPanelCols, nw = std::min(kPanelCols, N - c0);
    for (int m = 0; m < M; ++m) {
      alignas(64) float t[kPanelCols];
      _mm512_store_ps(t, s0[m]);
      _mm512_store_ps(t + 16, s1[m]);
      _mm512_store_ps(t + 32, s2[m]);
      _mm512_store_ps(t + 48, s3[m]);
      float* out = yr[m] + c0;
      for (int64_t n = 0; n < nw; ++n) out[n] = acc ? out[n] + alpha * t[n] : alpha * t[n];
    }
  }
}

// all M rows (four per read of a panel) against panels b0 .. b1 - 1, on the calling thread
inline void packed_serial(const float* const* x, int64_t M, const Packed& p, int64_t index, float* const* y,
                          float alpha, bool acc, int64_t b0, int64_t b1) {
  for (int64_t m = 0; m < M; m += 4) {
    const int64_t r = std::min<int64_t>(4, M - m);
    auto run = [&](auto fn) { fn(x + m, p, index, y + m, alpha, acc, b0, b1); };
    if (p.bf16) {
      r == 1 ? run(panels<1, true>) : r == 2 ? run(panels<2, true>) : r == 3 ? run(panels<3, true>) : run(panels<4, true>);
    } else {
      r == 1 ? run(panels<1, false>) : r == 2 ? run(panels<2, false>) : r == 3 ? run(panels<3, false>)
             : run(panels<4, false>);
    }
  }
}

// y[m] (+)= alpha * x[m] @ w for M rows, matrix `index` (0 for a 2-d w); the panels split across
// torch's threads (whole panels each: results independent of the split) unless `serial`
inline void packed_product(const float* const* x, int64_t M, const Packed& p, float* const* y, float alpha, bool acc,
                           int64_t index, bool serial, int64_t min_weights) {
  const int64_t grain = std::max<int64_t>(1, min_weights / std::max<int64_t>(1, p.K * kPanelCols));
  if (serial || p.panels <= grain || at::get_num_threads() == 1 || at::in_parallel_region()) {
    packed_serial(x, M, p, index, y, alpha, acc, 0, p.panels);
    return;
  }
  at::parallel_for(0, p.panels, grain,
                   [&](int64_t b0, int64_t b1) { packed_serial(x, M, p, index, y, alpha, acc, b0, b1); });
}

}  // namespace dsv3
