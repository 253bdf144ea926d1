// The thin per-tier vector layer the fused step's kernels are written over: 16-lane fp32 (F) and int32
// (I) vectors and the few instructions the kernels need, in one implementation per instruction set.
// The tier is what the compiler was told (layers/kernels.py passes each tier's flags explicitly):
//   avx512-bf16  zmm, vdpbf16ps and vpdpbusd          avx512-vnni  zmm, vpdpbusd, bf16 pairs widened
//   avx-vnni     2×ymm, 256-bit vpdpbusd, FMA, F16C   avx2         2×ymm, vpmaddubsw + vpmaddwd
//   neon-dotprod 4×128-bit NEON (AArch64), sdot for the u8 × s8 dot products (ARMv8.2 dot product)
//   portable     GCC vector extensions the compiler lowers to whatever the target has
// Everything above this file is tier-free: the kernels name these operations, never an intrinsic.
// No PyTorch here (nor in linear.h, attention.h' fused kernels): tests build them alone for AArch64.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VNNI__)
#define TAILSERVE_SIMD_AVX512 1
#include <immintrin.h>
#if defined(__AVX512BF16__)
#define TAILSERVE_TIER "avx512-bf16"
#define TAILSERVE_NATIVE_BF16 1
#else
#define TAILSERVE_TIER "avx512-vnni"
#endif
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TAILSERVE_SIMD_AVX2 1
#include <immintrin.h>
#if defined(__AVXVNNI__)
#define TAILSERVE_TIER "avx-vnni"
#else
#define TAILSERVE_TIER "avx2"
#endif
#elif defined(__aarch64__) && defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD)
#define TAILSERVE_SIMD_NEON 1
#include <arm_neon.h>
#define TAILSERVE_TIER "neon-dotprod"
#else
#define TAILSERVE_TIER "portable"
#endif

namespace simd {

constexpr int kLanes = 16;
// Rows of a linear's tile: as many as the register file holds accumulators for (bf16 pairs | VNNI).
#if defined(TAILSERVE_SIMD_AVX512)
constexpr int64_t kRowsPairs = 8, kRowsVnni = 4;
#else
constexpr int64_t kRowsPairs = 2, kRowsVnni = 2;
#endif

inline float bits_to_f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t f_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
// fp32 → bf16 bits, rounding to nearest even (as vcvtneps2bf16 and c10::BFloat16 do for finite values).
inline uint16_t bf16_round(float f) {
  const uint32_t u = f_to_bits(f);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#if defined(TAILSERVE_SIMD_AVX512)
// ---------------------------------------------------------------- AVX-512: one zmm per vector
struct F {
  __m512 v;
};
struct I {
  __m512i v;
};

inline F zero() { return {_mm512_setzero_ps()}; }
inline F set1(float x) { return {_mm512_set1_ps(x)}; }
inline F loadu(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void storeu(float* p, F a) { _mm512_storeu_ps(p, a.v); }
inline __mmask16 first(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}
inline F load_n(const float* p, int64_t n) { return {_mm512_maskz_loadu_ps(first(n), p)}; }
inline void store_n(float* p, F a, int64_t n) { _mm512_mask_storeu_ps(p, first(n), a.v); }
// Lanes [0, n) of a, the rest `fill`.
inline F select_first(int64_t n, F a, F fill) { return {_mm512_mask_mov_ps(fill.v, first(n), a.v)}; }
inline F add(F a, F b) { return {_mm512_add_ps(a.v, b.v)}; }
inline F sub(F a, F b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline F mul(F a, F b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline F div(F a, F b) { return {_mm512_div_ps(a.v, b.v)}; }
inline F max(F a, F b) { return {_mm512_max_ps(a.v, b.v)}; }
inline F min(F a, F b) { return {_mm512_min_ps(a.v, b.v)}; }
inline F abs(F a) { return {_mm512_abs_ps(a.v)}; }
inline F fmadd(F a, F b, F c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }   // a·b + c
inline F fnmadd(F a, F b, F c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }  // c − a·b
inline float reduce_add(F a) { return _mm512_reduce_add_ps(a.v); }
inline float reduce_max(F a) { return _mm512_reduce_max_ps(a.v); }
inline F round_nearest(F a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline F scale2(F p, F n) { return {_mm512_scalef_ps(p.v, n.v)}; }  // p · 2ⁿ, n integral
// 16 bf16 (bits) → fp32.
inline F load_bf16(const uint16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
}
inline F load_f16(const uint16_t* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }
inline __m256i bf16_bits(F a) {
#if defined(TAILSERVE_NATIVE_BF16)
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(a.v));
#else
  const __m512i u = _mm512_castps_si512(a.v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  return _mm512_cvtepi32_epi16(r);
#endif
}
inline void store_bf16(uint16_t* p, F a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_bits(a)); }
inline void store_bf16_n(uint16_t* p, F a, int64_t n) { _mm256_mask_storeu_epi16(p, first(n), bf16_bits(a)); }

inline I zero_i() { return {_mm512_setzero_si512()}; }
inline I set1_i(int32_t x) { return {_mm512_set1_epi32(x)}; }
inline I loadu_i(const void* p) { return {_mm512_loadu_si512(p)}; }
inline I and_i(I a, I b) { return {_mm512_and_si512(a.v, b.v)}; }
inline I or_i(I a, I b) { return {_mm512_or_si512(a.v, b.v)}; }
template <int N>
inline I srli(I a) { return {_mm512_srli_epi32(a.v, N)}; }
template <int N>
inline I slli(I a) { return {_mm512_slli_epi32(a.v, N)}; }
template <int N>
inline I srai(I a) { return {_mm512_srai_epi32(a.v, N)}; }
inline I add_i(I a, I b) { return {_mm512_add_epi32(a.v, b.v)}; }
inline int32_t reduce_add_i(I a) { return _mm512_reduce_add_epi32(a.v); }
inline F to_f(I a) { return {_mm512_cvtepi32_ps(a.v)}; }
inline I to_i(F a) { return {_mm512_cvtps_epi32(a.v)}; }  // rounding to nearest even
inline F as_f(I a) { return {_mm512_castsi512_ps(a.v)}; }
inline I as_i(F a) { return {_mm512_castps_si512(a.v)}; }
// 32 bytes zero-extended to 32 16-bit lanes (the int4 nibbles as bf16 pairs).
inline I widen_u8_u16(const uint8_t* p) {
  return {_mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
// 32 signed bytes, element order kept, as 32 16-bit lanes.
inline I widen_s8_s16(const int8_t* p) {
  return {_mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
inline void store_s8(int8_t* p, I a) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(a.v)); }
// acc + Σ of each lane's 4 u8·s8 products.
inline I dpbusd(I acc, I u, I s) { return {_mm512_dpbusd_epi32(acc.v, u.v, s.v)}; }
inline I narrow_begin(I wide) { return wide; }
inline I narrow_dot(I acc, I u, I s) { return dpbusd(acc, u, s); }
inline I narrow_end(I, I acc) { return acc; }

#elif defined(TAILSERVE_SIMD_AVX2)
// ---------------------------------------------------------------- AVX2 (+ AVX-VNNI): two ymm per vector
struct F {
  __m256 lo, hi;
};
struct I {
  __m256i lo, hi;
};

inline F zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline F set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline F loadu(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void storeu(float* p, F a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline F load_n(const float* p, int64_t n) {
  if (n >= 16) return loadu(p);
  alignas(32) float t[16] = {};
  if (n > 0) std::memcpy(t, p, n * sizeof(float));
  return loadu(t);
}
inline void store_n(float* p, F a, int64_t n) {
  if (n >= 16) return storeu(p, a);
  alignas(32) float t[16];
  storeu(t, a);
  if (n > 0) std::memcpy(p, t, n * sizeof(float));
}
inline F select_first(int64_t n, F a, F fill) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), nv = _mm256_set1_epi32(static_cast<int32_t>(n));
  const __m256 k0 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(nv, idx));
  const __m256 k1 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(nv, _mm256_add_epi32(idx, _mm256_set1_epi32(8))));
  return {_mm256_blendv_ps(fill.lo, a.lo, k0), _mm256_blendv_ps(fill.hi, a.hi, k1)};
}
#define TAILSERVE_F2(name, op) \
  inline F name(F a, F b) { return {op(a.lo, b.lo), op(a.hi, b.hi)}; }
TAILSERVE_F2(add, _mm256_add_ps)
TAILSERVE_F2(sub, _mm256_sub_ps)
TAILSERVE_F2(mul, _mm256_mul_ps)
TAILSERVE_F2(div, _mm256_div_ps)
TAILSERVE_F2(max, _mm256_max_ps)
TAILSERVE_F2(min, _mm256_min_ps)
#undef TAILSERVE_F2
inline F abs(F a) {
  const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  return {_mm256_and_ps(a.lo, m), _mm256_and_ps(a.hi, m)};
}
inline F fmadd(F a, F b, F c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline F fnmadd(F a, F b, F c) { return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)}; }
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float reduce_add(F a) { return hsum8(_mm256_add_ps(a.lo, a.hi)); }
inline float reduce_max(F a) {
  const __m256 m = _mm256_max_ps(a.lo, a.hi);
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline F round_nearest(F a) {
  constexpr int r = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.lo, r), _mm256_round_ps(a.hi, r)};
}
inline F load_bf16(const uint16_t* p) {
  auto w = [](const uint16_t* q) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  };
  return {w(p), w(p + 8)};
}
inline F load_f16(const uint16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
inline __m256i bf16_bits(F a) {
  auto r = [](__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  };
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(r(a.lo), r(a.hi)), 0xD8);
}
inline void store_bf16(uint16_t* p, F a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_bits(a)); }
inline void store_bf16_n(uint16_t* p, F a, int64_t n) {
  if (n >= 16) return store_bf16(p, a);
  alignas(32) uint16_t t[16];
  store_bf16(t, a);
  if (n > 0) std::memcpy(p, t, n * sizeof(uint16_t));
}

inline I zero_i() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
inline I set1_i(int32_t x) { return {_mm256_set1_epi32(x), _mm256_set1_epi32(x)}; }
inline I loadu_i(const void* p) {
  const auto* q = static_cast<const __m256i*>(p);
  return {_mm256_loadu_si256(q), _mm256_loadu_si256(q + 1)};
}
inline I and_i(I a, I b) { return {_mm256_and_si256(a.lo, b.lo), _mm256_and_si256(a.hi, b.hi)}; }
inline I or_i(I a, I b) { return {_mm256_or_si256(a.lo, b.lo), _mm256_or_si256(a.hi, b.hi)}; }
template <int N>
inline I srli(I a) { return {_mm256_srli_epi32(a.lo, N), _mm256_srli_epi32(a.hi, N)}; }
template <int N>
inline I slli(I a) { return {_mm256_slli_epi32(a.lo, N), _mm256_slli_epi32(a.hi, N)}; }
template <int N>
inline I srai(I a) { return {_mm256_srai_epi32(a.lo, N), _mm256_srai_epi32(a.hi, N)}; }
inline I add_i(I a, I b) { return {_mm256_add_epi32(a.lo, b.lo), _mm256_add_epi32(a.hi, b.hi)}; }
inline int32_t reduce_add_i(I a) {
  const __m256i s = _mm256_add_epi32(a.lo, a.hi);
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
}
inline F to_f(I a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
inline I to_i(F a) { return {_mm256_cvtps_epi32(a.lo), _mm256_cvtps_epi32(a.hi)}; }
inline F as_f(I a) { return {_mm256_castsi256_ps(a.lo), _mm256_castsi256_ps(a.hi)}; }
inline I as_i(F a) { return {_mm256_castps_si256(a.lo), _mm256_castps_si256(a.hi)}; }
inline F scale2(F p, F n) {  // p · 2ⁿ for integral n in [-126, 127]
  const __m256i bias = _mm256_set1_epi32(127);
  auto s = [&](__m256 x) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(x), bias), 23)); };
  return {_mm256_mul_ps(p.lo, s(n.lo)), _mm256_mul_ps(p.hi, s(n.hi))};
}
inline I widen_u8_u16(const uint8_t* p) {
  const auto* q = reinterpret_cast<const __m128i*>(p);
  return {_mm256_cvtepu8_epi16(_mm_loadu_si128(q)), _mm256_cvtepu8_epi16(_mm_loadu_si128(q + 1))};
}
inline I widen_s8_s16(const int8_t* p) {
  const auto* q = reinterpret_cast<const __m128i*>(p);
  return {_mm256_cvtepi8_epi16(_mm_loadu_si128(q)), _mm256_cvtepi8_epi16(_mm_loadu_si128(q + 1))};
}
inline void store_s8(int8_t* p, I a) {  // values already in int8 range
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(a.lo, a.hi), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
}
#if defined(__AVXVNNI__)
inline I dpbusd(I acc, I u, I s) { return {_mm256_dpbusd_avx_epi32(acc.lo, u.lo, s.lo), _mm256_dpbusd_avx_epi32(acc.hi, u.hi, s.hi)}; }
inline I narrow_begin(I wide) { return wide; }
inline I narrow_dot(I acc, I u, I s) { return dpbusd(acc, u, s); }
inline I narrow_end(I, I acc) { return acc; }
#else
inline I narrow_begin(I) { return zero_i(); }
// int16 pair sums: vpmaddubsw then one add, the vpmaddwd widening left to narrow_end.
inline I narrow_dot(I acc, I u, I s) {
  return {_mm256_add_epi16(acc.lo, _mm256_maddubs_epi16(u.lo, s.lo)), _mm256_add_epi16(acc.hi, _mm256_maddubs_epi16(u.hi, s.hi))};
}
inline I narrow_end(I wide, I acc) {
  const __m256i one = _mm256_set1_epi16(1);
  return {_mm256_add_epi32(wide.lo, _mm256_madd_epi16(acc.lo, one)), _mm256_add_epi32(wide.hi, _mm256_madd_epi16(acc.hi, one))};
}
// Any u: Σ u·s = Σ |u − 128|·sign(s, u − 128) + 128·Σ s, each term within vpmaddubsw's range (|s| ≤ 127).
inline I dpbusd(I acc, I u, I s) {
  const __m256i one = _mm256_set1_epi16(1), k128 = _mm256_set1_epi16(128), ones8 = _mm256_set1_epi8(1);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  auto half = [&](__m256i a, __m256i uu, __m256i ss) {
    const __m256i w = _mm256_xor_si256(uu, flip);
    const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(ss, w)), one);
    return _mm256_add_epi32(_mm256_add_epi32(a, p), _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, ss), k128));
  };
  return {half(acc.lo, u.lo, s.lo), half(acc.hi, u.hi, s.hi)};
}
#endif

#elif defined(TAILSERVE_SIMD_NEON)
// ---------------------------------------------------------------- NEON (AArch64): four q registers per vector
struct F {
  float32x4_t v[4];
};
struct I {
  int32x4_t v[4];
};
// r.v[j] = expr for each of the four quarters.
#define TAILSERVE_Q4(T, expr) \
  T r;                        \
  for (int j = 0; j < 4; ++j) r.v[j] = (expr);  \
  return r

inline F set1(float x) { TAILSERVE_Q4(F, vdupq_n_f32(x)); }
inline F zero() { return set1(0.f); }
inline F loadu(const float* p) { TAILSERVE_Q4(F, vld1q_f32(p + 4 * j)); }
inline void storeu(float* p, F a) {
  for (int j = 0; j < 4; ++j) vst1q_f32(p + 4 * j, a.v[j]);
}
inline F load_n(const float* p, int64_t n) {
  if (n >= 16) return loadu(p);
  alignas(16) float t[16] = {};
  if (n > 0) std::memcpy(t, p, n * sizeof(float));
  return loadu(t);
}
inline void store_n(float* p, F a, int64_t n) {
  if (n >= 16) return storeu(p, a);
  alignas(16) float t[16];
  storeu(t, a);
  if (n > 0) std::memcpy(p, t, n * sizeof(float));
}
inline F select_first(int64_t n, F a, F fill) {
  static const int32_t idx[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const int32x4_t nv = vdupq_n_s32(static_cast<int32_t>(n < 0 ? 0 : n > 16 ? 16 : n));
  TAILSERVE_Q4(F, vbslq_f32(vcltq_s32(vld1q_s32(idx + 4 * j), nv), a.v[j], fill.v[j]));
}
inline F add(F a, F b) { TAILSERVE_Q4(F, vaddq_f32(a.v[j], b.v[j])); }
inline F sub(F a, F b) { TAILSERVE_Q4(F, vsubq_f32(a.v[j], b.v[j])); }
inline F mul(F a, F b) { TAILSERVE_Q4(F, vmulq_f32(a.v[j], b.v[j])); }
inline F div(F a, F b) { TAILSERVE_Q4(F, vdivq_f32(a.v[j], b.v[j])); }
inline F max(F a, F b) { TAILSERVE_Q4(F, vmaxq_f32(a.v[j], b.v[j])); }
inline F min(F a, F b) { TAILSERVE_Q4(F, vminq_f32(a.v[j], b.v[j])); }
inline F abs(F a) { TAILSERVE_Q4(F, vabsq_f32(a.v[j])); }
inline F fmadd(F a, F b, F c) { TAILSERVE_Q4(F, vfmaq_f32(c.v[j], a.v[j], b.v[j])); }   // a·b + c
inline F fnmadd(F a, F b, F c) { TAILSERVE_Q4(F, vfmsq_f32(c.v[j], a.v[j], b.v[j])); }  // c − a·b
inline float reduce_add(F a) { return vaddvq_f32(vaddq_f32(vaddq_f32(a.v[0], a.v[1]), vaddq_f32(a.v[2], a.v[3]))); }
inline float reduce_max(F a) { return vmaxvq_f32(vmaxq_f32(vmaxq_f32(a.v[0], a.v[1]), vmaxq_f32(a.v[2], a.v[3]))); }
inline F round_nearest(F a) { TAILSERVE_Q4(F, vrndnq_f32(a.v[j])); }
inline F scale2(F p, F n) {  // p · 2ⁿ for integral n in [-126, 127]
  TAILSERVE_Q4(F, vmulq_f32(p.v[j], vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n.v[j]), vdupq_n_s32(127)), 23))));
}
inline F load_bf16(const uint16_t* p) {
  const uint16x8_t a = vld1q_u16(p), b = vld1q_u16(p + 8);
  F r;
  r.v[0] = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(a), 16));
  r.v[1] = vreinterpretq_f32_u32(vshll_high_n_u16(a, 16));
  r.v[2] = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(b), 16));
  r.v[3] = vreinterpretq_f32_u32(vshll_high_n_u16(b, 16));
  return r;
}
inline F load_f16(const uint16_t* p) {
  const float16x8_t a = vreinterpretq_f16_u16(vld1q_u16(p)), b = vreinterpretq_f16_u16(vld1q_u16(p + 8));
  F r;
  r.v[0] = vcvt_f32_f16(vget_low_f16(a));
  r.v[1] = vcvt_high_f32_f16(a);
  r.v[2] = vcvt_f32_f16(vget_low_f16(b));
  r.v[3] = vcvt_high_f32_f16(b);
  return r;
}
inline uint16x4_t bf16_bits4(float32x4_t v) {  // round to nearest even, as c10::BFloat16
  const uint32x4_t u = vreinterpretq_u32_f32(v);
  const uint32x4_t odd = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
  return vshrn_n_u32(vaddq_u32(u, vaddq_u32(odd, vdupq_n_u32(0x7FFF))), 16);
}
inline void store_bf16(uint16_t* p, F a) {
  vst1q_u16(p, vcombine_u16(bf16_bits4(a.v[0]), bf16_bits4(a.v[1])));
  vst1q_u16(p + 8, vcombine_u16(bf16_bits4(a.v[2]), bf16_bits4(a.v[3])));
}
inline void store_bf16_n(uint16_t* p, F a, int64_t n) {
  if (n >= 16) return store_bf16(p, a);
  alignas(16) uint16_t t[16];
  store_bf16(t, a);
  if (n > 0) std::memcpy(p, t, n * sizeof(uint16_t));
}

inline I set1_i(int32_t x) { TAILSERVE_Q4(I, vdupq_n_s32(x)); }
inline I zero_i() { return set1_i(0); }
inline I loadu_i(const void* p) { TAILSERVE_Q4(I, vld1q_s32(static_cast<const int32_t*>(p) + 4 * j)); }
inline I and_i(I a, I b) { TAILSERVE_Q4(I, vandq_s32(a.v[j], b.v[j])); }
inline I or_i(I a, I b) { TAILSERVE_Q4(I, vorrq_s32(a.v[j], b.v[j])); }
template <int N>
inline I srli(I a) { TAILSERVE_Q4(I, vreinterpretq_s32_u32(vshrq_n_u32(vreinterpretq_u32_s32(a.v[j]), N))); }
template <int N>
inline I slli(I a) { TAILSERVE_Q4(I, vshlq_n_s32(a.v[j], N)); }
template <int N>
inline I srai(I a) { TAILSERVE_Q4(I, vshrq_n_s32(a.v[j], N)); }
inline I add_i(I a, I b) { TAILSERVE_Q4(I, vaddq_s32(a.v[j], b.v[j])); }
inline int32_t reduce_add_i(I a) { return vaddvq_s32(vaddq_s32(vaddq_s32(a.v[0], a.v[1]), vaddq_s32(a.v[2], a.v[3]))); }
inline F to_f(I a) { TAILSERVE_Q4(F, vcvtq_f32_s32(a.v[j])); }
inline I to_i(F a) { TAILSERVE_Q4(I, vcvtnq_s32_f32(a.v[j])); }  // rounding to nearest even
inline F as_f(I a) { TAILSERVE_Q4(F, vreinterpretq_f32_s32(a.v[j])); }
inline I as_i(F a) { TAILSERVE_Q4(I, vreinterpretq_s32_f32(a.v[j])); }
inline I widen_u8_u16(const uint8_t* p) {
  const uint8x16_t a = vld1q_u8(p), b = vld1q_u8(p + 16);
  I r;
  r.v[0] = vreinterpretq_s32_u16(vmovl_u8(vget_low_u8(a)));
  r.v[1] = vreinterpretq_s32_u16(vmovl_high_u8(a));
  r.v[2] = vreinterpretq_s32_u16(vmovl_u8(vget_low_u8(b)));
  r.v[3] = vreinterpretq_s32_u16(vmovl_high_u8(b));
  return r;
}
inline I widen_s8_s16(const int8_t* p) {
  const int8x16_t a = vld1q_s8(p), b = vld1q_s8(p + 16);
  I r;
  r.v[0] = vreinterpretq_s32_s16(vmovl_s8(vget_low_s8(a)));
  r.v[1] = vreinterpretq_s32_s16(vmovl_high_s8(a));
  r.v[2] = vreinterpretq_s32_s16(vmovl_s8(vget_low_s8(b)));
  r.v[3] = vreinterpretq_s32_s16(vmovl_high_s8(b));
  return r;
}
inline void store_s8(int8_t* p, I a) {  // values already in int8 range
  const int16x8_t lo = vcombine_s16(vmovn_s32(a.v[0]), vmovn_s32(a.v[1]));
  const int16x8_t hi = vcombine_s16(vmovn_s32(a.v[2]), vmovn_s32(a.v[3]));
  vst1q_s8(p, vcombine_s8(vmovn_s16(lo), vmovn_s16(hi)));
}
// sdot multiplies signed bytes: u ≤ 15 (int4 nibbles) is one already; any u is u − 128 plus 128·Σ s.
inline I narrow_begin(I wide) { return wide; }
inline I narrow_dot(I acc, I u, I s) {
  TAILSERVE_Q4(I, vdotq_s32(acc.v[j], vreinterpretq_s8_s32(u.v[j]), vreinterpretq_s8_s32(s.v[j])));
}
inline I narrow_end(I, I acc) { return acc; }
inline I dpbusd(I acc, I u, I s) {
  const int8x16_t flip = vdupq_n_s8(static_cast<int8_t>(0x80)), ones = vdupq_n_s8(1);
  TAILSERVE_Q4(I, vaddq_s32(vdotq_s32(acc.v[j], veorq_s8(vreinterpretq_s8_s32(u.v[j]), flip), vreinterpretq_s8_s32(s.v[j])),
                            vshlq_n_s32(vdotq_s32(vdupq_n_s32(0), ones, vreinterpretq_s8_s32(s.v[j])), 7)));
}
#undef TAILSERVE_Q4

#else
// ---------------------------------------------------------------- portable: GCC vector extensions
typedef float f16v __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));
typedef uint32_t u16v __attribute__((vector_size(64)));
struct F {
  f16v v;
};
struct I {
  i16v v;
};

inline F zero() { return {f16v{}}; }
inline F set1(float x) { return {f16v{} + x}; }
inline F loadu(const float* p) {
  F a;
  std::memcpy(&a.v, p, sizeof a.v);
  return a;
}
inline void storeu(float* p, F a) { std::memcpy(p, &a.v, sizeof a.v); }
inline F load_n(const float* p, int64_t n) {
  if (n >= 16) return loadu(p);
  F a = zero();
  for (int64_t i = 0; i < n; ++i) a.v[i] = p[i];
  return a;
}
inline void store_n(float* p, F a, int64_t n) {
  for (int64_t i = 0; i < n && i < 16; ++i) p[i] = a.v[i];
}
inline F select_first(int64_t n, F a, F fill) {
  for (int i = 0; i < 16; ++i)
    if (i >= n) a.v[i] = fill.v[i];
  return a;
}
inline F add(F a, F b) { return {a.v + b.v}; }
inline F sub(F a, F b) { return {a.v - b.v}; }
inline F mul(F a, F b) { return {a.v * b.v}; }
inline F div(F a, F b) { return {a.v / b.v}; }
inline F max(F a, F b) { return {a.v > b.v ? a.v : b.v}; }
inline F min(F a, F b) { return {a.v < b.v ? a.v : b.v}; }
inline F abs(F a) { return {a.v < 0 ? -a.v : a.v}; }
inline F fmadd(F a, F b, F c) { return {a.v * b.v + c.v}; }
inline F fnmadd(F a, F b, F c) { return {c.v - a.v * b.v}; }
inline float reduce_add(F a) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += a.v[i];
  return s;
}
inline float reduce_max(F a) {
  float m = a.v[0];
  for (int i = 1; i < 16; ++i) m = m > a.v[i] ? m : a.v[i];
  return m;
}
// Round to nearest even for |a| < 2²², the range every caller keeps to (exp's n, int8 quantization):
// adding and subtracting 1.5·2²³ leaves no fraction bits, in vector arithmetic the compiler keeps.
inline F round_nearest(F a) {
  const f16v magic = f16v{} + 12582912.f;
  return {(a.v + magic) - magic};  // (no -ffast-math: the compiler keeps both)
}
inline F scale2(F p, F n) {
  for (int i = 0; i < 16; ++i) p.v[i] *= bits_to_f(static_cast<uint32_t>(static_cast<int32_t>(n.v[i]) + 127) << 23);
  return p;
}
inline F load_bf16(const uint16_t* p) {
  F a;
  for (int i = 0; i < 16; ++i) a.v[i] = bits_to_f(static_cast<uint32_t>(p[i]) << 16);
  return a;
}
// fp16 → fp32, exact for every value (subnormals included), branch-free: FP16's (and c10's) method on
// 16 lanes at once.
inline F load_f16(const uint16_t* p) {
  u16v w;
  for (int i = 0; i < 16; ++i) w[i] = static_cast<uint32_t>(p[i]) << 16;
  const u16v sign = w & 0x80000000u, two_w = w + w;
  const f16v normal = reinterpret_cast<f16v>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const f16v subnormal = reinterpret_cast<f16v>((two_w >> 17) | (126u << 23)) - 0.5f;
  const u16v value = two_w < (1u << 27) ? reinterpret_cast<u16v>(subnormal) : reinterpret_cast<u16v>(normal);
  return {reinterpret_cast<f16v>(sign | value)};
}
inline void store_bf16(uint16_t* p, F a) {
  for (int i = 0; i < 16; ++i) p[i] = bf16_round(a.v[i]);
}
inline void store_bf16_n(uint16_t* p, F a, int64_t n) {
  for (int64_t i = 0; i < n && i < 16; ++i) p[i] = bf16_round(a.v[i]);
}

inline I zero_i() { return {i16v{}}; }
inline I set1_i(int32_t x) { return {i16v{} + x}; }
inline I loadu_i(const void* p) {
  I a;
  std::memcpy(&a.v, p, sizeof a.v);
  return a;
}
inline I and_i(I a, I b) { return {a.v & b.v}; }
inline I or_i(I a, I b) { return {a.v | b.v}; }
template <int N>
inline I srli(I a) { return {reinterpret_cast<i16v>(reinterpret_cast<u16v>(a.v) >> N)}; }
template <int N>
inline I slli(I a) { return {reinterpret_cast<i16v>(reinterpret_cast<u16v>(a.v) << N)}; }
template <int N>
inline I srai(I a) { return {a.v >> N}; }
inline I add_i(I a, I b) { return {a.v + b.v}; }
inline int32_t reduce_add_i(I a) {
  int32_t s = 0;
  for (int i = 0; i < 16; ++i) s += a.v[i];
  return s;
}
inline F to_f(I a) { return {__builtin_convertvector(a.v, f16v)}; }
inline I to_i(F a) { return {__builtin_convertvector(round_nearest(a).v, i16v)}; }  // |a| < 2²²
inline F as_f(I a) { return {reinterpret_cast<f16v>(a.v)}; }
inline I as_i(F a) { return {reinterpret_cast<i16v>(a.v)}; }
inline I widen_u8_u16(const uint8_t* p) {
  uint16_t w[32];
  for (int i = 0; i < 32; ++i) w[i] = p[i];
  return loadu_i(w);
}
inline I widen_s8_s16(const int8_t* p) {
  int16_t w[32];
  for (int i = 0; i < 32; ++i) w[i] = p[i];
  return loadu_i(w);
}
inline void store_s8(int8_t* p, I a) {
  for (int i = 0; i < 16; ++i) p[i] = static_cast<int8_t>(a.v[i]);
}
inline I dpbusd(I acc, I u, I s) {  // byte j of every lane at once: 4 vector multiply-adds
  const u16v uu = reinterpret_cast<u16v>(u.v), su = reinterpret_cast<u16v>(s.v);
  for (int j = 0; j < 4; ++j) {
    const i16v uj = reinterpret_cast<i16v>((uu >> (8 * j)) & 0xFFu);
    const i16v sj = reinterpret_cast<i16v>(su << (24 - 8 * j)) >> 24;
    acc.v += uj * sj;
  }
  return acc;
}
// int16 pair sums, as AVX2's vpmaddubsw: 16-bit multiplies are cheap everywhere, 32-bit ones are not
// (x86's baseline has none).
typedef int16_t s32v __attribute__((vector_size(64)));
inline I narrow_begin(I) { return zero_i(); }
inline I narrow_dot(I acc, I u, I s) {
  const s32v uw = reinterpret_cast<s32v>(u.v), sw = reinterpret_cast<s32v>(s.v);
  const s32v u_even = uw & 0xFF, u_odd = (uw >> 8) & 0xFF, s_even = (sw << 8) >> 8, s_odd = sw >> 8;
  return {reinterpret_cast<i16v>(reinterpret_cast<s32v>(acc.v) + u_even * s_even + u_odd * s_odd)};
}
inline I narrow_end(I wide, I acc) { return {wide.v + ((acc.v << 16) >> 16) + (acc.v >> 16)}; }
#endif

// Small dot products (u ≤ 15: int4 nibbles; |s| ≤ 127) summed over at most kNarrowSteps steps in the
// tier's cheapest accumulator: narrow_begin(wide), narrow_dot each step, then narrow_end(wide, narrow)
// gives wide + the steps' sums. With vpdpbusd that is the int32 lanes themselves; without it, int16
// pair sums (8 steps · 2 · 15 · 127 < 2¹⁵) widened once at the end instead of at every step.
constexpr int64_t kNarrowSteps = 8;

// ---------------------------------------------------------------- tier-free compositions

// exp on 16 lanes (Cephes' expf as in common.h's fast_exp; ~2 ulp on [-87, 0]), saturating above 88.
inline F exp(F x) {
  x = max(x, set1(-87.f));
#if !defined(TAILSERVE_SIMD_AVX512)
  x = min(x, set1(88.f));  // 2ⁿ is built from its exponent bits: n must stay below 128
#endif
  const F n = round_nearest(mul(x, set1(1.44269504088896341f)));
  const F r = fmadd(n, set1(2.12194440e-4f), fnmadd(n, set1(0.693359375f), x));
  F p = set1(1.9875691500e-4f);
  p = fmadd(p, r, set1(1.3981999507e-3f));
  p = fmadd(p, r, set1(8.3334519073e-3f));
  p = fmadd(p, r, set1(4.1665795894e-2f));
  p = fmadd(p, r, set1(1.6666665459e-1f));
  p = fmadd(p, r, set1(5.0000001201e-1f));
  p = fmadd(mul(p, r), r, add(r, set1(1.f)));
  return scale2(p, n);
}

// 16 lanes each holding a pair of bf16 values (k, k + 1): vdpbf16ps' operand. Where the instruction
// exists it is the register itself; elsewhere the pair widened to two fp32 vectors once, so every
// row's multiply is two FMAs (exact products, as vdpbf16ps').
#if defined(TAILSERVE_NATIVE_BF16)
struct Pairs {
  __m512bh v;
};
inline Pairs pairs(I bits) { return {reinterpret_cast<__m512bh>(bits.v)}; }
inline Pairs bcast_pair(uint32_t p) { return pairs(set1_i(static_cast<int32_t>(p))); }
inline F dpbf16(F acc, Pairs x, Pairs w) { return {_mm512_dpbf16_ps(acc.v, x.v, w.v)}; }
// 32 s8 weights (element order: channel c's pair at 2c, 2c + 1) as exact bf16 pairs.
inline Pairs pairs_s8(const int8_t* p) {
  auto f = [](const int8_t* q) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)))); };
  return {_mm512_cvtne2ps_pbh(f(p + 16), f(p))};
}
#else
struct Pairs {
  F even, odd;
};
inline Pairs pairs(I bits) { return {as_f(slli<16>(bits)), as_f(and_i(bits, set1_i(static_cast<int32_t>(0xFFFF0000u))))}; }
inline Pairs bcast_pair(uint32_t p) { return {set1(bits_to_f(p << 16)), set1(bits_to_f(p & 0xFFFF0000u))}; }
inline F dpbf16(F acc, Pairs x, Pairs w) { return fmadd(x.odd, w.odd, fmadd(x.even, w.even, acc)); }
inline Pairs pairs_s8(const int8_t* p) {
  const I w = widen_s8_s16(p);  // lane c: (s16 of channel c's k, s16 of its k + 1)
  return {to_f(srai<16>(slli<16>(w))), to_f(srai<16>(w))};
}
#endif

}  // namespace simd
