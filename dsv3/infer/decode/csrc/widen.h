// Loads shared by the native decode kernels (few_rows.cpp, paged_attention.cpp): FP32 values, or
// BF16 ones widened to FP32 as they are loaded (exact: a BF16 value is the high half of its FP32);
// and the one FP32 -> BF16 rounding (few_rows.cpp, amx_gemm.cpp).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace dsv3 {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const uint16_t* p) {  // 8 BF16 -> 8 FP32: the BF16 bits are the high half
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float load1(const float* p) { return *p; }

inline float load1(const uint16_t* p) {
  uint32_t bits = static_cast<uint32_t>(*p) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// FP32 -> BF16 rounded to nearest even (as torch's .to(torch.bfloat16)); NaN stays a quiet NaN
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace dsv3
