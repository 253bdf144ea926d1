// Shared helpers of the CPU kernels: argument checks, bf16 as bits, a vectorizable exp, and the AVX-512
// helpers of the PyTorch path's decode attention (the fused step's kernels use simd.h instead). Nothing
// here needs PyTorch: the module is plain C++ behind a C interface (capi.cpp), loaded by a process that
// may never import torch.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace tailserve {

// A bad argument: the C interface (capi.cpp) turns it into an error code and this message.
template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream s;
  (s << ... << parts);
  throw std::invalid_argument(s.str());
}
#define TS_CHECK(cond, ...)                        \
  do {                                             \
    if (!(cond)) ::tailserve::fail(__VA_ARGS__);   \
  } while (0)

// fp32 → bf16 bits, rounding to nearest even; NaN stays a (quiet) NaN, as PyTorch rounds.
inline uint16_t bf16_bits(float f) {
  if (std::isnan(f)) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// A bf16 value, held as its bits (the PyTorch path's bf16 tensors, the fused step's weights and KV).
struct BF16 {
  uint16_t x;
  BF16() = default;
  explicit BF16(float f) : x(bf16_bits(f)) {}
};

inline float load_f(float v) { return v; }
inline float load_f(BF16 v) {
  uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// exp for the softmax, written so loops over it vectorize (Cephes' expf; ~2 ulp on [-87, 0]).
inline float fast_exp(float x) {
  x = x < -87.f ? -87.f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * load_f(b[i]);
  return s;
}

// [begin, end) of thread `tid`'s share of n items split evenly among nt threads.
inline void thread_range(int64_t n, int tid, int nt, int64_t& begin, int64_t& end) {
  begin = n * tid / nt;
  end = n * (tid + 1) / nt;
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const BF16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

// The same two steps with head_dim = 16·DC held in registers: each K/V row is loaded and widened
// once for all G query heads of its KV head.
// Lane i of the result = sum of v[i]'s lanes: 16 horizontal sums in 45 shuffles/adds instead of ~130.
inline __m512 hsum16(__m512* v) {
  for (int i = 0; i < 8; ++i)
    v[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    v[i] = _mm512_add_ps(_mm512_shuffle_ps(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_ps(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; ++i)
    v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x88), _mm512_shuffle_f32x4(v[0], v[1], 0xDD));
}
#endif


}  // namespace tailserve
