// BF16 GEMMs on AMX tiles for a few rows, and the grouped expert GEMM in one call
// (dsv3.infer.decode.gemm.AmxPacked).
//
// Why: oneDNN's packed BF16 linear costs ~50-100 us a call on top of its bytes (per-call set-up),
// which is most of the time of the small products of a batched decode step: the routed experts'
// GEMMs (16 rows against a [512, 512] matrix: 2x faster here) and every matrix at up to 32 rows
// (1.25-1.9x). From 64 rows on, oneDNN's kernels are as fast or faster, and the caller keeps them.
//
// The arithmetic: x (FP32) rounded to BF16 to nearest even, products summed in FP32 by the tile
// unit, the output FP32 (not rounded to BF16, unlike oneDNN's BF16 linear). The order of the sums
// is fixed by the loops below (K in steps of 32, pairs summed inside the instruction), and every
// output element is computed by one thread: results do not depend on the thread count.
//
// Layouts. A weight w [K, N] (x @ w) is packed once into [N/16, K/32, 16, 32] BF16 (`amx_pack`;
// K padded to 32 and N to 16 with zeros): for each block of 16 output columns, for each 32 inputs,
// one tile of 16 rows, row r holding the pairs (w[2r, c], w[2r + 1, c]) for the 16 columns c (the
// "VNNI" layout TDPBF16PS multiplies). The rows x are rounded into a row-major BF16 copy [Mp, Kp]
// (zero-padded), read as 16 x 32 tiles. A block of 32 rows x 32 columns keeps 4 accumulator tiles,
// 2 row tiles and 2 weight tiles: the 8 tile registers, each loaded tile used twice.
//
// The OS must grant the process the tile state (arch_prctl ARCH_REQ_XCOMP_PERM; Linux >= 5.16):
// `amx_ready` asks once and says whether it may run. Compilers without AMX intrinsics build stubs.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "widen.h"  // dsv3::to_bf16

#if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 12) || \
                            (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define DSV3_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int64_t kTile = 512;  // BF16 elements of one 16 x 32 tile

#ifdef DSV3_AMX
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bf16,avx512bw,avx512vl")

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void configure() {  // 8 tiles of 16 rows x 64 bytes: C 0-3 (FP32), A 4-5, B 6-7 (BF16)
  TileConfig c;
  for (int t = 0; t < 8; t++) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  // GCC 12 does not see _tile_loadconfig read `c` and drops the stores above: make them visible
  __asm__ __volatile__("" : : "r"(&c) : "memory");
  _tile_loadconfig(&c);
}

void release() { _tile_release(); }  // the tile state back to the OS's initial one

// C [MT * 16, NT * 16] (row stride ldc floats) = rows a (stride lda) x the kb tiles of b0 | b1
template <int MT, int NT>
inline void block(const uint16_t* a, int64_t lda, const uint16_t* b0, const uint16_t* b1, int64_t kb,
                  float* c, int64_t ldc) {
  _tile_zero(0);
  if (NT > 1) _tile_zero(1);
  if (MT > 1) _tile_zero(2);
  if (MT > 1 && NT > 1) _tile_zero(3);
  for (int64_t k = 0; k < kb; k++) {
    _tile_loadd(6, b0 + k * kTile, 64);
    _tile_loadd(4, a + k * 32, lda * 2);
    _tile_dpbf16ps(0, 4, 6);
    if (NT > 1) {
      _tile_loadd(7, b1 + k * kTile, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if (MT > 1) {
      _tile_loadd(5, a + k * 32 + 16 * lda, lda * 2);
      _tile_dpbf16ps(2, 5, 6);
      if (NT > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, ldc * 4);
  if (NT > 1) _tile_stored(1, c + 16, ldc * 4);
  if (MT > 1) _tile_stored(2, c + 16 * ldc, ldc * 4);
  if (MT > 1 && NT > 1) _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
}

// rows [m0, m1) of A times the column pair j (blocks 2j, 2j + 1) of one packed weight -> out
void rows_times_pair(const uint16_t* A, int64_t Kp, const uint16_t* B, int64_t nb, int64_t kb, int64_t j,
                     int64_t m0, int64_t m1, float* out, int64_t N, const float* add) {
  alignas(64) float c[32 * 32];
  const bool two = 2 * j + 1 < nb;
  const uint16_t* b0 = B + 2 * j * kb * kTile;
  const uint16_t* b1 = b0 + kb * kTile;
  const int64_t col = 32 * j, cols = std::min<int64_t>(32, N - col);
  for (int64_t m = m0; m < m1; m += 32) {
    const uint16_t* a = A + m * Kp;
    if (m1 - m > 16) {
      two ? block<2, 2>(a, Kp, b0, b1, kb, c, 32) : block<2, 1>(a, Kp, b0, b1, kb, c, 32);
    } else {
      two ? block<1, 2>(a, Kp, b0, b1, kb, c, 32) : block<1, 1>(a, Kp, b0, b1, kb, c, 32);
    }
    const int64_t rows = std::min<int64_t>(32, m1 - m);
    for (int64_t r = 0; r < rows; r++) {
      float* o = out + (m + r) * N + col;
      const float* s = c + r * 32;
      if (add) {
        const float* p = add + (m + r) * N + col;
        for (int64_t i = 0; i < cols; i++) o[i] = s[i] + p[i];
      } else {
        std::memcpy(o, s, cols * sizeof(float));
      }
    }
  }
}

// x [M, K] FP32 -> BF16 [Mp, Kp], rounded to nearest even, zero-padded
void round_rows(const float* x, int64_t M, int64_t K, uint16_t* a, int64_t Kp) {
  for (int64_t m = 0; m < M; m++) {
    const float* s = x + m * K;
    uint16_t* d = a + m * Kp;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + k + 16), _mm512_loadu_ps(s + k));
      _mm512_storeu_si512(d + k, (__m512i)v);
    }
    for (; k < K; k++) d[k] = dsv3::to_bf16(s[k]);
  }
}
#pragma GCC pop_options

bool granted() {
  return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}
#endif

void check_packed(const torch::Tensor& p, int64_t dims) {
  TORCH_CHECK(p.dim() == dims && p.scalar_type() == torch::kBFloat16 && p.is_contiguous() &&
                  p.size(-2) == 16 && p.size(-1) == 32,
              "amx: not a packed weight (amx_pack)");
}

struct Rounded {  // the rows rounded to BF16, with 32 zero rows beyond the last (tile overrun)
  torch::Tensor a;
  int64_t Kp;
};

Rounded rounded(const torch::Tensor& x, int64_t kb) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "amx: x must be [M, K] FP32");
  TORCH_CHECK(x.size(1) <= kb * 32 && x.size(1) > (kb - 1) * 32, "amx: x has ", x.size(1),
              " inputs, the packed weight ", kb * 32);
  const int64_t M = x.size(0), Kp = kb * 32;
  auto a = torch::zeros({(M + 15) / 16 * 16 + 32, Kp}, torch::kBFloat16);
#ifdef DSV3_AMX
  auto xc = x.contiguous();
  round_rows(xc.data_ptr<float>(), M, x.size(1), reinterpret_cast<uint16_t*>(a.data_ptr()), Kp);
#endif
  return {a, Kp};
}

}  // namespace

bool amx_ready() {
#ifdef DSV3_AMX
  static const bool ok = granted();
  return ok;
#else
  return false;
#endif
}

// w [K, N] (or [E, K, N]) BF16 -> [N/16, K/32, 16, 32] (or [E, ...]) in the tiles' layout
torch::Tensor amx_pack(torch::Tensor w) {
  TORCH_CHECK((w.dim() == 2 || w.dim() == 3) && w.scalar_type() == torch::kBFloat16,
              "amx_pack: w must be [K, N] or [E, K, N] BF16");
  auto w3 = (w.dim() == 2 ? w.unsqueeze(0) : w).contiguous();
  const int64_t E = w3.size(0), K = w3.size(1), N = w3.size(2), kb = (K + 31) / 32, nb = (N + 15) / 16;
  auto p = torch::zeros({E, nb, kb, 16, 32}, torch::kBFloat16);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w3.data_ptr());
  uint16_t* dst = reinterpret_cast<uint16_t*>(p.data_ptr());
  at::parallel_for(0, E * nb, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) {
      const int64_t e = i / nb, j = i % nb, cols = std::min<int64_t>(16, N - 16 * j);
      const uint16_t* s = src + e * K * N + 16 * j;
      uint16_t* d = dst + i * kb * kTile;
      for (int64_t k = 0; k < K; k++)
        for (int64_t c = 0; c < cols; c++) d[(k / 32) * kTile + ((k % 32) / 2) * 32 + 2 * c + (k % 2)] = s[k * N + c];
    }
  });
  return w.dim() == 2 ? p.squeeze(0) : p;
}

// x [M, K] FP32 @ the packed weight (N outputs) (+ add [M, N] FP32) -> [M, N] FP32
torch::Tensor amx_mm(torch::Tensor x, torch::Tensor packed, int64_t N, c10::optional<torch::Tensor> add) {
  check_packed(packed, 4);
  TORCH_CHECK(amx_ready(), "amx_mm: AMX is not available in this process");
  const int64_t nb = packed.size(0), kb = packed.size(1), M = x.size(0);
  TORCH_CHECK(N <= nb * 16 && N > (nb - 1) * 16, "amx_mm: N=", N, " does not match the packed weight");
  torch::Tensor addc;
  if (add) {
    TORCH_CHECK(add->scalar_type() == torch::kFloat32 && add->size(0) == M && add->size(1) == N,
                "amx_mm: add must be [M, N] FP32");
    addc = add->contiguous();
  }
  auto r = rounded(x, kb);
  auto out = torch::empty({M, N}, torch::kFloat32);
#ifdef DSV3_AMX
  const uint16_t* A = reinterpret_cast<const uint16_t*>(r.a.data_ptr());
  const uint16_t* B = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  float* O = out.data_ptr<float>();
  const float* P = add ? addc.data_ptr<float>() : nullptr;
  at::parallel_for(0, (nb + 1) / 2, 1, [&](int64_t j0, int64_t j1) {
    configure();
    for (int64_t j = j0; j < j1; j++) rows_times_pair(A, r.Kp, B, nb, kb, j, 0, M, O, N, P);
    release();
  });
#endif
  return out;
}

// rows x [M, K] FP32 sorted by expert (expert e's are starts[e]..starts[e+1]) times packed [E, ...]
// -> [M, N] FP32: every expert's GEMM in one call
torch::Tensor amx_grouped(torch::Tensor x, torch::Tensor packed, std::vector<int64_t> starts, int64_t N) {
  check_packed(packed, 5);
  TORCH_CHECK(amx_ready(), "amx_grouped: AMX is not available in this process");
  const int64_t E = packed.size(0), nb = packed.size(1), kb = packed.size(2), M = x.size(0);
  TORCH_CHECK(static_cast<int64_t>(starts.size()) == E + 1 && starts[0] == 0 && starts[E] == M,
              "amx_grouped: starts must be E + 1 row boundaries from 0 to M");
  for (int64_t e = 0; e < E; e++) TORCH_CHECK(starts[e] <= starts[e + 1], "amx_grouped: starts must not decrease");
  TORCH_CHECK(N <= nb * 16 && N > (nb - 1) * 16, "amx_grouped: N=", N, " does not match the packed weight");
  auto r = rounded(x, kb);
  auto out = torch::empty({M, N}, torch::kFloat32);
#ifdef DSV3_AMX
  const int64_t pairs = (nb + 1) / 2;
  std::vector<int64_t> items;  // (expert, column pair) with rows
  for (int64_t e = 0; e < E; e++)
    if (starts[e + 1] > starts[e])
      for (int64_t j = 0; j < pairs; j++) items.push_back(e * pairs + j);
  const uint16_t* A = reinterpret_cast<const uint16_t*>(r.a.data_ptr());
  const uint16_t* B = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  float* O = out.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    configure();
    for (int64_t i = i0; i < i1; i++) {
      const int64_t e = items[i] / pairs, j = items[i] % pairs;
      rows_times_pair(A, r.Kp, B + e * nb * kb * kTile, nb, kb, j, starts[e], starts[e + 1], O, N, nullptr);
    }
    release();
  });
#endif
  return out;
}

void add_amx_gemm(pybind11::module_& m) {  // called by few_rows.cpp's module definition
  using nogil = py::call_guard<py::gil_scoped_release>;
  m.def("amx_ready", &amx_ready, "whether the AMX GEMMs can run in this process");
  m.def("amx_pack", &amx_pack, "w [K, N] or [E, K, N] BF16 -> the tiles' layout", nogil());
  m.def("amx_mm", &amx_mm, "x @ packed (+ add), FP32 in and out, BF16 products", py::arg("x"),
        py::arg("packed"), py::arg("n"), py::arg("add") = py::none(), nogil());
  m.def("amx_grouped", &amx_grouped, "expert-sorted rows x times their experts' packed weights", nogil());
}
