// Weights packed for streaming: the one-row decoder's matrices (few_rows.cpp RowDecoder), read
// with AVX-512F loops where the CPU has it, else AVX2 ones.
//
// A lone token reads every matrix once, so a step's time is its bytes over the memory bandwidth
// one core draws. On the row-major [K, N] layout the few-row loop (few_rows.cpp `block`) reads four
// weight rows at a time, four streams a few KB apart, and keeps the sums in L1: measured on the AMD
// EPYC (Zen 4, 1 thread, weights out of cache) it streams BF16 at 10-16 GB/s where a plain read of
// the same bytes runs at 21-25 GB/s: the memory waits and the arithmetic do not overlap.
// Packed, each run of 64 output columns (a panel) is one contiguous [K, 64] slab read front to
// back, its 64 sums per row in four AVX-512 registers: 21-28 GB/s on the same matrices (e.g.
// [2048, 512] 200 -> 74 us, [1536, 2048] 435 -> 300 us). With AVX2 only (Zen 3) the row-major loop
// streams BF16 at 9-13 GB/s, packed at 17-19 (the plain read's 17-20); see `panel_row8`.
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
#include <memory>

namespace dsv3 {

constexpr int64_t kPanelCols = 64;

struct Packed {
  torch::Tensor data;  // [count, panels, K, 64]: float32, or BF16 bits (interleaved as above) in an int16 tensor
  int64_t K = 0, N = 0, panels = 0;
  bool bf16 = false;
  bool wide = false;  // read with the AVX-512F loop (`panels`), else the AVX2 ones (`panel_row8`, `panels_rows8`)

  bool defined() const { return data.defined(); }
  int64_t matrix_size() const { return panels * K * kPanelCols; }
};

// w [K, N] (unit column stride, any row stride) or a contiguous [count, K, N], FP32 or BF16
inline Packed pack(const torch::Tensor& w, bool wide) {
  TORCH_CHECK((w.dim() == 2 && w.stride(1) == 1) || (w.dim() == 3 && w.is_contiguous()),
              "pack: expected [K, N] with unit column stride or a contiguous [count, K, N], got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 || w.scalar_type() == torch::kBFloat16,
              "pack: expected float32 or bfloat16, got ", w.scalar_type());
  Packed p;
  p.K = w.size(-2);
  p.N = w.size(-1);
  p.panels = (p.N + kPanelCols - 1) / kPanelCols;
  p.bf16 = w.scalar_type() == torch::kBFloat16;
  p.wide = wide;
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

// The AVX2 loops (16 ymm registers: one row's 64 sums of a panel fill 8). They read pack's layout
// unchanged: an 8-lane load j of a panel row holds FP32 columns 8j .. 8j + 7, or BF16 dwords
// 8j .. 8j + 7, columns 32 (j / 2) + 8 (j % 2) + (0 .. 7) in the low halves and those + 16 in the
// high ones. Software prefetch kAheadRows panel rows ahead, measured on the AMD EPYC (Zen 3, AVX2
// only, weights out of cache, alternating runs): one BF16 row ~1.1x faster with it (8 rows ahead;
// 4 and 16 less), one FP32 row ~1.2x slower (so not there), 2-4 rows of either 1.1-1.7x faster.
constexpr int64_t kAheadRows = 8;

template <bool BF16>
inline void load_row8(const uint16_t* wb, const float* wf, int64_t at, int j, __m256& lo, __m256& hi) {
  if constexpr (BF16) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + at + 16 * j));
    lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    hi = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  } else {
    lo = _mm256_loadu_ps(wf + at + 8 * j);
    hi = lo;  // FP32: one 8-column load per j
  }
}

template <bool BF16>
constexpr int row_column(int j, bool high) {  // the first of the 8 columns load j's low / high half holds
  return BF16 ? 32 * (j / 2) + 8 * (j % 2) + (high ? 16 : 0) : 8 * j;
}

// one row, AVX2: panels b0 .. b1 - 1 of matrix `index`, the panel's 64 sums in 8 registers, its
// slab read front to back. The same Zen 3 against `block` (1 thread): BF16 1.3-1.85x (17-19 GB/s,
// a plain read's speed), FP32 0.9-1.4x (both near the read's 17-20 GB/s)
template <bool BF16>
void panel_row8(const float* x, const Packed& p, int64_t index, float* y, float alpha, bool acc, int64_t b0,
                int64_t b1) {
  constexpr int kLoads = BF16 ? 4 : 8;  // 8-lane loads per panel row
  constexpr int64_t kBytes = kPanelCols * (BF16 ? 2 : 4);
  const int64_t K = p.K, N = p.N, first = index * p.matrix_size();
  const uint16_t* wb = BF16 ? reinterpret_cast<const uint16_t*>(p.data.data_ptr()) + first : nullptr;
  const float* wf = BF16 ? nullptr : p.data.data_ptr<float>() + first;
  const char* base = BF16 ? reinterpret_cast<const char*>(wb) : reinterpret_cast<const char*>(wf);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t off = b * K * kPanelCols, c0 = b * kPanelCols, nw = std::min(kPanelCols, N - c0);
    __m256 s[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) s[i] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      if (BF16 && k + kAheadRows < K)
        for (int64_t l = 0; l < kBytes; l += 64)
          _mm_prefetch(base + (off + (k + kAheadRows) * kPanelCols) * (BF16 ? 2 : 4) + l, _MM_HINT_T0);
      const __m256 xk = _mm256_set1_ps(x[k]);
#pragma GCC unroll 8
      for (int j = 0; j < kLoads; ++j) {
        __m256 lo, hi;
        load_row8<BF16>(wb, wf, off + k * kPanelCols, j, lo, hi);
        if constexpr (BF16) {
          s[2 * j] = _mm256_fmadd_ps(xk, lo, s[2 * j]);
          s[2 * j + 1] = _mm256_fmadd_ps(xk, hi, s[2 * j + 1]);
        } else {
          s[j] = _mm256_fmadd_ps(xk, lo, s[j]);
        }
      }
    }
    alignas(32) float t[kPanelCols];
    for (int j = 0; j < kLoads; ++j) {
      _mm256_store_ps(t + row_column<BF16>(j, false), s[BF16 ? 2 * j : j]);
      if (BF16) _mm256_store_ps(t + row_column<BF16>(j, true), s[2 * j + 1]);
    }
    float* out = y + c0;
    for (int64_t n = 0; n < nw; ++n) out[n] = acc ? out[n] + alpha * t[n] : alpha * t[n];
  }
}

// M = 2 .. 4 rows, AVX2: a panel's slab read once front to back, four of its rows (k .. k + 3) at a
// time, the M x 64 sums in L1, loaded and stored once per four weight rows as `block` does (the
// sums of two rows would take all 16 registers). The same Zen 3 against `block`: BF16 two rows
// 1.15-1.6x, four 0.8-1.1x; FP32 0.85-1.45x.
template <int M, bool BF16>
void panels_rows8(const float* const* x, const Packed& p, int64_t index, float* const* y, float alpha, bool acc,
                  int64_t b0, int64_t b1) {
  constexpr int kLoads = BF16 ? 4 : 8;
  constexpr int64_t kBytes = 4 * kPanelCols * (BF16 ? 2 : 4);  // four panel rows
  const int64_t K = p.K, N = p.N, first = index * p.matrix_size();
  const float* xr[M];
  float* yr[M];
  for (int m = 0; m < M; ++m) xr[m] = x[m], yr[m] = y[m];
  const uint16_t* wb = BF16 ? reinterpret_cast<const uint16_t*>(p.data.data_ptr()) + first : nullptr;
  const float* wf = BF16 ? nullptr : p.data.data_ptr<float>() + first;
  const char* base = BF16 ? reinterpret_cast<const char*>(wb) : reinterpret_cast<const char*>(wf);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t off = b * K * kPanelCols, c0 = b * kPanelCols, nw = std::min(kPanelCols, N - c0);
    alignas(32) float t[M][kPanelCols] = {};
    for (int64_t k = 0; k < K; k += 4) {
      const int r = static_cast<int>(std::min<int64_t>(4, K - k));  // weight rows in this step
      if (k + 4 + kAheadRows <= K)
        for (int64_t l = 0; l < kBytes; l += 64)
          _mm_prefetch(base + (off + (k + kAheadRows) * kPanelCols) * (BF16 ? 2 : 4) + l, _MM_HINT_T0);
      __m256 xb[M][4];
      for (int m = 0; m < M; ++m)
        for (int i = 0; i < 4; ++i) xb[m][i] = _mm256_set1_ps(i < r ? xr[m][k + i] : 0.f);
#pragma GCC unroll 8
      for (int j = 0; j < kLoads; ++j) {
        __m256 lo[4], hi[4];
        for (int i = 0; i < r; ++i) load_row8<BF16>(wb, wf, off + (k + i) * kPanelCols, j, lo[i], hi[i]);
        for (int m = 0; m < M; ++m) {
          float* sl = t[m] + row_column<BF16>(j, false);
          __m256 a = _mm256_load_ps(sl);
          for (int i = 0; i < r; ++i) a = _mm256_fmadd_ps(xb[m][i], lo[i], a);
          _mm256_store_ps(sl, a);
          if constexpr (BF16) {
            float* sh = t[m] + row_column<BF16>(j, true);
            __m256 c = _mm256_load_ps(sh);
            for (int i = 0; i < r; ++i) c = _mm256_fmadd_ps(xb[m][i], hi[i], c);
            _mm256_store_ps(sh, c);
          }
        }
      }
    }
    for (int m = 0; m < M; ++m) {
      float* out = yr[m] + c0;
      for (int64_t n = 0; n < nw; ++n) out[n] = acc ? out[n] + alpha * t[m][n] : alpha * t[m][n];
    }
  }
}

// ---- many rows, AVX2: a register tile over strips of 16 columns ----
//
// Layout: [count, strips, K, 16], strips = ceil(N / 16), the columns past N zero: each run of 16
// output columns one contiguous [K, 16] slab. FP32 in column order; BF16 with each row's 16 columns as
// 8 dwords, dword i holding column i in its low half and column 8 + i in its high half (widened by a
// shift and a mask, as pack's). R rows of a strip keep their R x 16 sums in 2R of AVX2's 16 registers,
// each 64-byte (FP32) or 32-byte (BF16) weight row feeding 2R FMAs, the strip read front to back.
// On the panels of 64 (pack's layout) the same tile reads a slab's rows at a 256-byte stride, four
// passes: measured on the AMD EPYC (Zen 3, 1 thread, weights out of cache) it streamed ~8 GB/s, the
// rate of oneDNN's packed GEMM at 5-8 rows, against 16.5 GB/s for `panels_rows8`'s sequential read
// at 4 rows.
constexpr int64_t kStripCols = 16;

inline torch::Tensor pack_strips(const torch::Tensor& w) {
  TORCH_CHECK((w.dim() == 2 && w.stride(1) == 1) || (w.dim() == 3 && w.is_contiguous()),
              "pack_strips: expected [K, N] with unit column stride or a contiguous [count, K, N], got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 || w.scalar_type() == torch::kBFloat16,
              "pack_strips: expected float32 or bfloat16, got ", w.scalar_type());
  const bool bf16 = w.scalar_type() == torch::kBFloat16;
  const int64_t K = w.size(-2), N = w.size(-1), ld = w.stride(-2), count = w.dim() == 3 ? w.size(0) : 1;
  const int64_t strips = (N + kStripCols - 1) / kStripCols;
  auto out = torch::zeros({count, strips, K, kStripCols}, bf16 ? torch::kInt16 : torch::kFloat32);
  at::parallel_for(0, count * strips, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t es = s0; es < s1; ++es) {
      const int64_t e = es / strips, c0 = (es % strips) * kStripCols, nw = std::min(kStripCols, N - c0);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t src = e * K * N + k * ld + c0, dst = (es * K + k) * kStripCols;
        if (bf16) {
          const auto* s = reinterpret_cast<const uint16_t*>(w.data_ptr()) + src;
          auto* d = reinterpret_cast<uint16_t*>(out.data_ptr()) + dst;
          for (int64_t j = 0; j < nw; ++j) d[2 * (j % 8) + j / 8] = s[j];
        } else {
          std::memcpy(out.data_ptr<float>() + dst, w.data_ptr<float>() + src, nw * sizeof(float));
        }
      }
    }
  });
  return out;
}

constexpr int kTileRows = 6;  // the tile's most rows: 12 sums, 2 weights and a broadcast of 16 registers
// strip rows per block (8 KB of FP32): the row groups after the first find them in L1. While a
// block is read, the next one (the strip's next rows, else the next strip's first: the layout is
// contiguous) is prefetched into L2, one line per step of each row group's pass, spread over the
// passes: memory streams while the later groups compute. Measured on the AMD EPYC (Zen 3, 1 thread,
// v3-mini's matrices out of cache, bench/strips_vs_onednn.py, alternating): 8-16 rows ~1.2-1.5x
// faster than prefetching 32 rows ahead in the first pass only (the memory idle during the others);
// into L1 instead of L2, or 256-row blocks, slower
constexpr int64_t kTileK = 128;

// R = 1 .. 6 rows against the rows k0 .. k0 + n - 1 of one strip (`w` at row k0), the sums taken from
// and put back into t (16 per row); every `every` steps the line at `ahead` prefetched into L2 (and
// `ahead` moved on by a line)
template <int R, bool BF16>
inline void strip_rows(const float* const* x, const void* w, int64_t k0, int64_t n, float* t, const char* ahead,
                       int64_t every) {
  __m256 s0[R], s1[R];
  const float* xr[R];
#pragma GCC unroll 6
  for (int m = 0; m < R; ++m) {
    s0[m] = _mm256_load_ps(t + m * kStripCols);
    s1[m] = _mm256_load_ps(t + m * kStripCols + 8);
    xr[m] = x[m] + k0;
  }
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t k = 0, next = 0; k < n; ++k) {
    if (k == next) {
      _mm_prefetch(ahead, _MM_HINT_T1);
      ahead += 64;
      next += every;
    }
    __m256 w0, w1;
    if constexpr (BF16) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + k * 16));
      w0 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      w1 = _mm256_castsi256_ps(_mm256_and_si256(v, high));
    } else {
      w0 = _mm256_loadu_ps(static_cast<const float*>(w) + k * 16);
      w1 = _mm256_loadu_ps(static_cast<const float*>(w) + k * 16 + 8);
    }
#pragma GCC unroll 6
    for (int m = 0; m < R; ++m) {
      const __m256 xk = _mm256_broadcast_ss(xr[m] + k);
      s0[m] = _mm256_fmadd_ps(xk, w0, s0[m]);
      s1[m] = _mm256_fmadd_ps(xk, w1, s1[m]);
    }
  }
#pragma GCC unroll 6
  for (int m = 0; m < R; ++m) {
    _mm256_store_ps(t + m * kStripCols, s0[m]);
    _mm256_store_ps(t + m * kStripCols + 8, s1[m]);
  }
}

// y[m][c] (+)= alpha * x[m] @ w[:, c] for M rows over strips s0 .. s1 - 1 of matrix `index` of `data`
// (pack_strips' layout, N columns), on the calling thread: per strip, per block of kTileK rows, the
// rows in groups of up to kTileRows (evened out: 8 rows as 4 + 4). The sums run over k in order, as
// every loop here.
template <bool BF16>
void strips_serial(const float* const* x, int64_t M, const torch::Tensor& data, int64_t N, int64_t index,
                   float* const* y, float alpha, bool acc, int64_t s0, int64_t s1) {
  const int64_t K = data.size(2), es = BF16 ? 2 : 4;
  const char* base = reinterpret_cast<const char*>(data.data_ptr()) + index * data.size(1) * K * kStripCols * es;
  const int64_t groups = (M + kTileRows - 1) / kTileRows;
  auto buffer = std::make_unique<__m256[]>(2 * M);  // 32-byte aligned sums, M x 16
  float* t = reinterpret_cast<float*>(buffer.get());
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t c0 = s * kStripCols, nw = std::min(kStripCols, N - c0);
    const char* strip = base + s * K * kStripCols * es;
    std::fill(t, t + M * kStripCols, 0.f);
    for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
      const int64_t n = std::min(kTileK, K - k0);
      for (int64_t q = 0, m = 0; q < groups; ++q) {
        const int64_t r = (M - m) / (groups - q);  // the rows left, spread evenly over the groups left
        // group q prefetches its share of the next block's lines, one every `groups` steps (FP32: a
        // line a strip row; BF16 a line two rows, one every 2 x `groups`)
        const char* ahead = strip + (k0 + kTileK + q * ((kTileK + groups - 1) / groups)) * kStripCols * es;
        auto run = [&](auto fn) {
          fn(x + m, strip + k0 * kStripCols * es, k0, n, t + m * kStripCols, ahead, groups * (BF16 ? 2 : 1));
        };
        switch (r) {
          case 1: run(strip_rows<1, BF16>); break;
          case 2: run(strip_rows<2, BF16>); break;
          case 3: run(strip_rows<3, BF16>); break;
          case 4: run(strip_rows<4, BF16>); break;
          case 5: run(strip_rows<5, BF16>); break;
          default: run(strip_rows<6, BF16>);
        }
        m += r;
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      float* out = y[m] + c0;
      const float* v = t + m * kStripCols;
      for (int64_t c = 0; c < nw; ++c) out[c] = acc ? out[c] + alpha * v[c] : alpha * v[c];
    }
  }
}

// strips_serial for the strips' dtype (FP32, or BF16 bits in int16)
inline void strips_range(const float* const* x, int64_t M, const torch::Tensor& data, int64_t N, int64_t index,
                         float* const* y, float alpha, bool acc, int64_t s0, int64_t s1) {
  data.scalar_type() == torch::kInt16 ? strips_serial<true>(x, M, data, N, index, y, alpha, acc, s0, s1)
                                      : strips_serial<false>(x, M, data, N, index, y, alpha, acc, s0, s1);
}

// strips_serial over all strips, split across torch's threads (whole strips each: results independent
// of the split) unless `serial`
inline void strips_product(const float* const* x, int64_t M, const torch::Tensor& data, int64_t N, int64_t index,
                           float* const* y, float alpha, bool acc, bool serial, int64_t min_weights) {
  const int64_t strips = data.size(1), grain = std::max<int64_t>(1, min_weights / std::max<int64_t>(1, data.size(2) * kStripCols));
  auto run = [&](int64_t a, int64_t b) { strips_range(x, M, data, N, index, y, alpha, acc, a, b); };
  if (serial || strips <= grain || at::get_num_threads() == 1 || at::in_parallel_region()) {
    run(0, strips);
    return;
  }
  at::parallel_for(0, strips, grain, run);
}

// all M rows (four per read of a panel) against panels b0 .. b1 - 1, on the calling thread: the
// AVX-512 loop where the pack asked for it (`wide`), else AVX2's
inline void packed_serial(const float* const* x, int64_t M, const Packed& p, int64_t index, float* const* y,
                          float alpha, bool acc, int64_t b0, int64_t b1) {
  for (int64_t m = 0; m < M; m += 4) {
    const int64_t r = std::min<int64_t>(4, M - m);
    auto run = [&](auto fn) { fn(x + m, p, index, y + m, alpha, acc, b0, b1); };
    if (p.wide && p.bf16) {
      r == 1 ? run(panels<1, true>) : r == 2 ? run(panels<2, true>) : r == 3 ? run(panels<3, true>) : run(panels<4, true>);
    } else if (p.wide) {
      r == 1 ? run(panels<1, false>) : r == 2 ? run(panels<2, false>) : r == 3 ? run(panels<3, false>)
             : run(panels<4, false>);
    } else if (p.bf16) {
      r == 1   ? panel_row8<true>(x[m], p, index, y[m], alpha, acc, b0, b1)
      : r == 2 ? run(panels_rows8<2, true>)
      : r == 3 ? run(panels_rows8<3, true>)
               : run(panels_rows8<4, true>);
    } else {
      r == 1   ? panel_row8<false>(x[m], p, index, y[m], alpha, acc, b0, b1)
      : r == 2 ? run(panels_rows8<2, false>)
      : r == 3 ? run(panels_rows8<3, false>)
               : run(panels_rows8<4, false>);
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
