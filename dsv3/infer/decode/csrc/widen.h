// Loads shared by the native decode kernels (few_rows.cpp, paged_attention.cpp): FP32 values, or
// BF16 ones widened to FP32 as they are loaded (exact: a BF16 value is the high half of its FP32).
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

}  // namespace dsv3
