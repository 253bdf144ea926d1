// CPU kernels for the decode hot path, where PyTorch's generic ops lose most of the memory bandwidth:
//  - paged decode attention: reads each sequence's K/V rows straight from the paged pool (no gather
//    copy, no padding to the longest context), online softmax, fp32 accumulation;
//  - small-M linears over weights packed for `vdpbf16ps` (bf16, int8 per-channel, int4 group-wise),
//    dequantizing in registers so every weight byte is read from memory exactly once per call.
// The attention kernel is portable C++; the linears need AVX512-BF16 (`has_bf16_linear()` says).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float load_f(float v) { return v; }
inline float load_f(c10::BFloat16 v) {
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

constexpr int64_t kTokenTile = 32;  // tokens scored together before their softmax update

// s[g][j] = q_g · k_j for one tile (q pre-scaled, fp32).
template <typename T>
void tile_scores(const float* qf, int64_t G, int64_t D, const T* const* kp, int64_t nt, float* s) {
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j = 0; j < nt; ++j) s[g * kTokenTile + j] = dot(qf + g * D, kp[j], D);
}

// acc_g += Σ_j p[g][j] · v_j for one tile.
template <typename T>
void tile_values(float* acc, int64_t G, int64_t D, const T* const* vp, int64_t nt, const float* p) {
  for (int64_t j = 0; j < nt; ++j)
    for (int64_t g = 0; g < G; ++g) {
      const float w = p[g * kTokenTile + j];
      float* ag = acc + g * D;
      const T* v = vp[j];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ag[d] += w * load_f(v[d]);
    }
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
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

constexpr int64_t kMaxGroup = 16;  // query heads per KV head the vector path handles

// The same two steps with head_dim = 16·DC held in registers: each K/V row is loaded and widened
// once for all G query heads of its KV head.
template <int DC, typename T>
void tile_scores_v(const float* qf, int64_t G, const T* const* kp, int64_t nt, float* s) {
  __m512 part[kMaxGroup][16];
  for (int64_t j0 = 0; j0 < nt; j0 += 16) {
    const int64_t jn = std::min<int64_t>(16, nt - j0);
    for (int64_t jj = 0; jj < 16; ++jj) {
      if (jj >= jn) {
        for (int64_t g = 0; g < G; ++g) part[g][jj] = _mm512_setzero_ps();
        continue;
      }
      __m512 k[DC];
      for (int c = 0; c < DC; ++c) k[c] = load16(kp[j0 + jj] + 16 * c);
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qf + g * 16 * DC;
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qg), k[0]);
        for (int c = 1; c < DC; ++c) a = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * c), k[c], a);
        part[g][jj] = a;
      }
    }
    for (int64_t g = 0; g < G; ++g) _mm512_storeu_ps(s + g * kTokenTile + j0, hsum16(part[g]));
  }
}

template <int DC, typename T>
void tile_values_v(float* acc, int64_t G, const T* const* vp, int64_t nt, const float* p) {
  alignas(64) float vf[kTokenTile][16 * DC];  // the tile's V rows widened once, shared by the G heads
  for (int64_t j = 0; j < nt; ++j)
    for (int c = 0; c < DC; ++c) _mm512_store_ps(vf[j] + 16 * c, load16(vp[j] + 16 * c));
  for (int64_t g = 0; g < G; ++g) {
    float* ag = acc + g * 16 * DC;
    const float* pg = p + g * kTokenTile;
    __m512 a[DC], b[DC];  // two interleaved chains hide the FMA latency
    for (int c = 0; c < DC; ++c) {
      a[c] = _mm512_loadu_ps(ag + 16 * c);
      b[c] = _mm512_setzero_ps();
    }
    int64_t j = 0;
    for (; j + 1 < nt; j += 2) {
      const __m512 w0 = _mm512_set1_ps(pg[j]), w1 = _mm512_set1_ps(pg[j + 1]);
      for (int c = 0; c < DC; ++c) {
        a[c] = _mm512_fmadd_ps(w0, _mm512_load_ps(vf[j] + 16 * c), a[c]);
        b[c] = _mm512_fmadd_ps(w1, _mm512_load_ps(vf[j + 1] + 16 * c), b[c]);
      }
    }
    if (j < nt) {
      const __m512 w0 = _mm512_set1_ps(pg[j]);
      for (int c = 0; c < DC; ++c) a[c] = _mm512_fmadd_ps(w0, _mm512_load_ps(vf[j] + 16 * c), a[c]);
    }
    for (int c = 0; c < DC; ++c) _mm512_storeu_ps(ag + 16 * c, _mm512_add_ps(a[c], b[c]));
  }
}
// fast_exp on 16 lanes.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}
#endif

// Online-softmax step for one query head's tile of scores: s ← exp(s − m'), returns Σ exp and sets
// m ← m' = max(m, max s), alpha ← exp(m − m') (the rescale of what was accumulated before).
inline float softmax_tile(float* s, int64_t nt, float& m, float& alpha) {
#if defined(__AVX512F__)
  static_assert(kTokenTile == 32, "two 16-lane vectors per tile");
  const __mmask16 k0 = nt >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nt) - 1);
  const __mmask16 k1 = nt >= 32 ? __mmask16(0xFFFF) : __mmask16((1u << std::max<int64_t>(nt - 16, 0)) - 1);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 a = _mm512_mask_loadu_ps(ninf, k0, s), b = _mm512_mask_loadu_ps(ninf, k1, s + 16);
  const float mnew = std::max(m, _mm512_reduce_max_ps(_mm512_max_ps(a, b)));
  const __m512 mv = _mm512_set1_ps(mnew);
  const __m512 ea = _mm512_maskz_mov_ps(k0, exp16(_mm512_sub_ps(a, mv)));
  const __m512 eb = _mm512_maskz_mov_ps(k1, exp16(_mm512_sub_ps(b, mv)));
  _mm512_storeu_ps(s, ea);
  _mm512_storeu_ps(s + 16, eb);
  alpha = fast_exp(m - mnew);
  m = mnew;
  return _mm512_reduce_add_ps(_mm512_add_ps(ea, eb));
#else
  float mnew = m;
  for (int64_t j = 0; j < nt; ++j) mnew = std::max(mnew, s[j]);
  float add = 0.f;
  for (int64_t j = 0; j < nt; ++j) {
    s[j] = fast_exp(s[j] - mnew);
    add += s[j];
  }
  alpha = fast_exp(m - mnew);
  m = mnew;
  return add;
#endif
}

template <typename T>
void scores(const float* qf, int64_t G, int64_t D, const T* const* kp, int64_t nt, float* s) {
#if defined(__AVX512F__)
  if (G <= kMaxGroup && D == 64) return tile_scores_v<4>(qf, G, kp, nt, s);
  if (G <= kMaxGroup && D == 128) return tile_scores_v<8>(qf, G, kp, nt, s);
#endif
  tile_scores(qf, G, D, kp, nt, s);
}

template <typename T>
void values(float* acc, int64_t G, int64_t D, const T* const* vp, int64_t nt, const float* p) {
#if defined(__AVX512F__)
  if (D == 64) return tile_values_v<4>(acc, G, vp, nt, p);
  if (D == 128) return tile_values_v<8>(acc, G, vp, nt, p);
#endif
  tile_values(acc, G, D, vp, nt, p);
}

// One query row per (n): attends to tokens [0, lens[n]) of its sequence, whose token t lives in slot
// table[n][t / block_size] * block_size + t % block_size (block_size 1: the table lists slots).
// A work item is a row and `hp` of its KV heads (all of them when there are rows enough to keep every
// thread busy, so each token's K/V slot is read as one contiguous run); it streams the rows once, in
// tiles, with an online softmax per query head.
template <typename T>
void decode_attention_impl(const T* q, const T* kc, const T* vc, T* out, const int64_t* table,
                           int64_t table_stride, int64_t block_size, const int64_t* lens, int64_t N,
                           int64_t H, int64_t Hkv, int64_t D, float scale) {
  const int64_t G = H / Hkv;
  const int64_t hp = N >= 2 * at::get_num_threads() ? Hkv : 1;
  const int64_t splits = Hkv / hp;
  at::parallel_for(0, N * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(hp * G * D), acc(hp * G * D), s(G * kTokenTile), mx(hp * G), sum(hp * G);
    int64_t base[kTokenTile];
    const int64_t span_bytes = hp * D * static_cast<int64_t>(sizeof(T));
    const T* kp[kTokenTile];
    const T* vp[kTokenTile];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / splits, h0 = item % splits * hp, ctx = lens[n];
      const int64_t* row = table + n * table_stride;
      const T* qn = q + (n * H + h0 * G) * D;
      for (int64_t i = 0; i < hp * G * D; ++i) qf[i] = load_f(qn[i]) * scale;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(mx.begin(), mx.end(), -std::numeric_limits<float>::infinity());
      std::fill(sum.begin(), sum.end(), 0.f);
      for (int64_t t0 = 0; t0 < ctx; t0 += kTokenTile) {
        const int64_t nt = std::min(kTokenTile, ctx - t0);
        for (int64_t j = 0; j < nt; ++j) {
          const int64_t t = t0 + j;
          base[j] = ((row[t / block_size] * block_size + t % block_size) * Hkv + h0) * D;
        }
        // Rows of consecutive tiles lie in scattered blocks that the hardware prefetcher cannot
        // foresee: request the next tile's K/V while this one computes, so DRAM misses overlap.
        for (int64_t t = t0 + kTokenTile; t < std::min(ctx, t0 + 2 * kTokenTile); ++t) {
          const int64_t off = ((row[t / block_size] * block_size + t % block_size) * Hkv + h0) * D;
          const char* kb = reinterpret_cast<const char*>(kc + off);
          const char* vb = reinterpret_cast<const char*>(vc + off);
          for (int64_t b = 0; b < span_bytes; b += 64) {
            __builtin_prefetch(kb + b);
            __builtin_prefetch(vb + b);
          }
        }
        for (int64_t hh = 0; hh < hp; ++hh) {
          for (int64_t j = 0; j < nt; ++j) {
            kp[j] = kc + base[j] + hh * D;
            vp[j] = vc + base[j] + hh * D;
          }
          const int64_t x = hh * G;  // this KV head's first query head within the item
          scores(qf.data() + x * D, G, D, kp, nt, s.data());
          for (int64_t g = 0; g < G; ++g) {
            float alpha;  // 0 on the first tile (mx = -inf)
            const float add = softmax_tile(s.data() + g * kTokenTile, nt, mx[x + g], alpha);
            sum[x + g] = sum[x + g] * alpha + add;
            float* ag = acc.data() + (x + g) * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ag[d] *= alpha;
          }
          values(acc.data() + x * D, G, D, vp, nt, s.data());
        }
      }
      T* on = out + (n * H + h0 * G) * D;
      for (int64_t i = 0; i < hp * G; ++i) {
        const float inv = sum[i] > 0.f ? 1.f / sum[i] : 0.f;
        for (int64_t d = 0; d < D; ++d) on[i * D + d] = static_cast<T>(acc[i * D + d] * inv);
      }
    }
  });
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor table, int64_t block_size, torch::Tensor lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "need contiguous q/cache");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type(),
              "q and caches must share a dtype");
  TORCH_CHECK(table.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "table/lens must be int64");
  TORCH_CHECK(table.dim() == 2 && table.stride(1) == 1 && lens.is_contiguous(), "bad table/lens layout");
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == D && H % Hkv == 0 && table.size(0) == N && lens.size(0) == N, "shape mismatch");
  const int64_t max_ctx = table.size(1) * block_size;
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) TORCH_CHECK(lp[n] >= 1 && lp[n] <= max_ctx, "context length out of range");
  auto out = torch::empty_like(q);
  const auto st = table.stride(0);
  if (q.scalar_type() == at::kFloat) {
    decode_attention_impl<float>(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                                 out.data_ptr<float>(), table.data_ptr<int64_t>(), st, block_size, lp, N, H, Hkv,
                                 D, static_cast<float>(scale));
  } else {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, "decode_attention supports float32 and bfloat16");
    using B = c10::BFloat16;
    decode_attention_impl<B>(q.data_ptr<B>(), k_cache.data_ptr<B>(), v_cache.data_ptr<B>(), out.data_ptr<B>(),
                             table.data_ptr<int64_t>(), st, block_size, lp, N, H, Hkv, D,
                             static_cast<float>(scale));
  }
  return out;
}

#if defined(__AVX512BF16__)
// Packed weights: blocks of 32 output channels; within a block, K/2 "pair steps", each holding for
// every channel two consecutive k values (vdpbf16ps' operand layout), as two 16-channel halves.
//   bf16: 128 B per pair step (half 0 then half 1);
//   int8: 64 B per pair step, same order, per-channel fp32 scale applied at the end;
//   int4: 32 B per pair step: byte e = half0[e] | half1[e] << 4 (unsigned 0..15), one (scale, min)
//         fp16 pair per channel per group; q is fed to vdpbf16ps as the exact bf16 value 128 + q
//         (bits 0x4300 | q) and the 128·Σx term is folded into the group's offset.
enum Kind { kBf16 = 0, kInt8 = 1, kInt4 = 2 };
constexpr int64_t kBlock = 32;

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh>(v); }

inline __m512 int8x16_to_ps(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

template <int KIND>
inline void load_pair(const uint8_t* w, int64_t p, __m512bh& w0, __m512bh& w1) {
  if constexpr (KIND == kBf16) {
    const uint8_t* a = w + p * 128;
    w0 = as_bh(_mm512_loadu_si512(a));
    w1 = as_bh(_mm512_loadu_si512(a + 64));
  } else if constexpr (KIND == kInt8) {
    const int8_t* a = reinterpret_cast<const int8_t*>(w + p * 64);
    w0 = _mm512_cvtne2ps_pbh(int8x16_to_ps(a + 16), int8x16_to_ps(a));
    w1 = _mm512_cvtne2ps_pbh(int8x16_to_ps(a + 48), int8x16_to_ps(a + 32));
  } else {
    const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + p * 32)));
    const __m512i base = _mm512_set1_epi16(0x4300);
    w0 = as_bh(_mm512_or_si512(_mm512_and_si512(b, _mm512_set1_epi16(0x000F)), base));
    w1 = as_bh(_mm512_or_si512(_mm512_srli_epi16(b, 4), base));
  }
}

struct LinearArgs {
  const uint16_t* x;  // [M, K] bf16 bits
  int64_t M, K, N;
  const uint8_t* w;       // packed blocks
  const float* scale;     // int8: [N_padded]
  const uint16_t* gscale;  // int4: [blocks, K / group, 2, 32] fp16 bits (scale, min)
  const float* xsum;      // int4: [M, K / group]
  int64_t group;
  uint16_t* y;  // [M, N] bf16 bits
};

inline void store_row(uint16_t* y, int64_t n0, int64_t N, __m512 v0, __m512 v1) {
  const int64_t left = N - n0;
  const __mmask16 k0 = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << std::max<int64_t>(left, 0)) - 1);
  const __mmask16 k1 = left >= 32 ? __mmask16(0xFFFF) : __mmask16((1u << std::max<int64_t>(left - 16, 0)) - 1);
  _mm256_mask_storeu_epi16(y + n0, k0, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v0)));
  _mm256_mask_storeu_epi16(y + n0 + 16, k1, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v1)));
}

// Rows [m0, m0 + MT) × channels of block `blk`.
template <int KIND, int MT>
void linear_tile(const LinearArgs& a, int64_t blk, int64_t m0) {
  const int64_t P = a.K / 2;
  const int32_t* xr[MT];
  for (int m = 0; m < MT; ++m) xr[m] = reinterpret_cast<const int32_t*>(a.x + (m0 + m) * a.K);
  __m512 y0[MT], y1[MT];
  for (int m = 0; m < MT; ++m) y0[m] = y1[m] = _mm512_setzero_ps();
  if constexpr (KIND == kInt4) {
    const uint8_t* wb = a.w + blk * P * 32;
    const int64_t groups = a.K / a.group, gp = a.group / 2;
    for (int64_t g = 0; g < groups; ++g) {
      __m512 c0[MT], c1[MT];
      for (int m = 0; m < MT; ++m) c0[m] = c1[m] = _mm512_setzero_ps();
      for (int64_t p = g * gp; p < (g + 1) * gp; ++p) {
        __m512bh w0, w1;
        load_pair<KIND>(wb, p, w0, w1);
        for (int m = 0; m < MT; ++m) {
          const __m512bh xb = as_bh(_mm512_set1_epi32(xr[m][p]));
          c0[m] = _mm512_dpbf16_ps(c0[m], xb, w0);
          c1[m] = _mm512_dpbf16_ps(c1[m], xb, w1);
        }
      }
      const uint16_t* gs = a.gscale + (blk * groups + g) * 64;
      const __m512 d0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(gs)));
      const __m512 d1 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(gs + 16)));
      const __m512 k128 = _mm512_set1_ps(128.f);
      const __m512 o0 = _mm512_fnmadd_ps(k128, d0,
                                         _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(gs + 32))));
      const __m512 o1 = _mm512_fnmadd_ps(k128, d1,
                                         _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(gs + 48))));
      for (int m = 0; m < MT; ++m) {
        const __m512 xs = _mm512_set1_ps(a.xsum[(m0 + m) * groups + g]);
        y0[m] = _mm512_fmadd_ps(o0, xs, _mm512_fmadd_ps(d0, c0[m], y0[m]));
        y1[m] = _mm512_fmadd_ps(o1, xs, _mm512_fmadd_ps(d1, c1[m], y1[m]));
      }
    }
  } else {
    const uint8_t* wb = a.w + blk * P * (KIND == kBf16 ? 128 : 64);
    for (int64_t p = 0; p < P; ++p) {
      __m512bh w0, w1;
      load_pair<KIND>(wb, p, w0, w1);
      for (int m = 0; m < MT; ++m) {
        const __m512bh xb = as_bh(_mm512_set1_epi32(xr[m][p]));
        y0[m] = _mm512_dpbf16_ps(y0[m], xb, w0);
        y1[m] = _mm512_dpbf16_ps(y1[m], xb, w1);
      }
    }
    if constexpr (KIND == kInt8) {
      const __m512 s0 = _mm512_loadu_ps(a.scale + blk * kBlock), s1 = _mm512_loadu_ps(a.scale + blk * kBlock + 16);
      for (int m = 0; m < MT; ++m) {
        y0[m] = _mm512_mul_ps(y0[m], s0);
        y1[m] = _mm512_mul_ps(y1[m], s1);
      }
    }
  }
  for (int m = 0; m < MT; ++m) store_row(a.y + (m0 + m) * a.N, blk * kBlock, a.N, y0[m], y1[m]);
}

template <int KIND>
void linear_rows(const LinearArgs& a, int64_t blk) {
  constexpr int64_t kMaxRows = KIND == kInt4 ? 4 : 8;  // accumulators that fit the 32 zmm registers
  for (int64_t m0 = 0; m0 < a.M; m0 += kMaxRows) {
    switch (std::min(kMaxRows, a.M - m0)) {
      case 1: linear_tile<KIND, 1>(a, blk, m0); break;
      case 2: linear_tile<KIND, 2>(a, blk, m0); break;
      case 3: linear_tile<KIND, 3>(a, blk, m0); break;
      case 4: linear_tile<KIND, 4>(a, blk, m0); break;
      case 5: if constexpr (kMaxRows > 4) linear_tile<KIND, 5>(a, blk, m0); break;
      case 6: if constexpr (kMaxRows > 4) linear_tile<KIND, 6>(a, blk, m0); break;
      case 7: if constexpr (kMaxRows > 4) linear_tile<KIND, 7>(a, blk, m0); break;
      default: if constexpr (kMaxRows > 4) linear_tile<KIND, 8>(a, blk, m0); break;
    }
  }
}

template <int KIND>
torch::Tensor linear_impl(const torch::Tensor& x, const torch::Tensor& w, int64_t n, const float* scale,
                          const uint16_t* gscale, int64_t group) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.dim() == 2, "x must be contiguous 2-D bf16");
  TORCH_CHECK(w.is_contiguous() && x.size(1) % 2 == 0, "bad packed weight or odd K");
  const int64_t M = x.size(0), K = x.size(1), blocks = (n + kBlock - 1) / kBlock;
  const int64_t bytes_per_pair = KIND == kBf16 ? 128 : KIND == kInt8 ? 64 : 32;
  TORCH_CHECK(w.nbytes() == static_cast<size_t>(blocks * (K / 2) * bytes_per_pair), "packed weight size mismatch");
  auto y = torch::empty({M, n}, x.options());
  if (M == 0) return y;
  std::vector<float> xsum;
  LinearArgs a{reinterpret_cast<const uint16_t*>(x.data_ptr()), M, K, n,
               static_cast<const uint8_t*>(w.data_ptr()), scale, gscale, nullptr, group,
               reinterpret_cast<uint16_t*>(y.data_ptr())};
  if constexpr (KIND == kInt4) {
    TORCH_CHECK(group % 2 == 0 && K % group == 0, "K must be a multiple of the (even) group size");
    const int64_t groups = K / group;
    xsum.assign(M * groups, 0.f);
    const auto* xb = x.data_ptr<c10::BFloat16>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) xsum[m * groups + k / group] += load_f(xb[m * K + k]);
    a.xsum = xsum.data();
  }
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) linear_rows<KIND>(a, blk);
  });
  return y;
}

torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor w, int64_t n) {
  return linear_impl<kBf16>(x, w, n, nullptr, nullptr, 0);
}

torch::Tensor linear_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scale, int64_t n) {
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == (n + kBlock - 1) / kBlock * kBlock, "bad scale");
  return linear_impl<kInt8>(x, w, n, scale.data_ptr<float>(), nullptr, 0);
}

torch::Tensor linear_int4(torch::Tensor x, torch::Tensor w, torch::Tensor gscale, int64_t n, int64_t group) {
  TORCH_CHECK(gscale.scalar_type() == at::kHalf && gscale.is_contiguous(), "group scales must be fp16");
  TORCH_CHECK(gscale.numel() == (n + kBlock - 1) / kBlock * (x.size(1) / group) * 64, "bad group scales");
  return linear_impl<kInt4>(x, w, n, nullptr, reinterpret_cast<const uint16_t*>(gscale.data_ptr()), group);
}

bool has_bf16_linear() { return true; }
#else
torch::Tensor unsupported(torch::Tensor, torch::Tensor, int64_t) {
  TORCH_CHECK(false, "built without AVX512-BF16");
}
torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor w, int64_t n) { return unsupported(x, w, n); }
torch::Tensor linear_int8(torch::Tensor x, torch::Tensor w, torch::Tensor, int64_t n) { return unsupported(x, w, n); }
torch::Tensor linear_int4(torch::Tensor x, torch::Tensor w, torch::Tensor, int64_t n, int64_t) {
  return unsupported(x, w, n);
}
bool has_bf16_linear() { return false; }
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "paged decode attention over a flat KV pool");
  m.def("linear_bf16", &linear_bf16, "x @ W.T for block-packed bf16 W");
  m.def("linear_int8", &linear_int8, "x @ W.T for block-packed int8 W with per-channel scales");
  m.def("linear_int4", &linear_int4, "x @ W.T for block-packed int4 W with per-group scale and min");
  m.def("has_bf16_linear", &has_bf16_linear, "whether the linears were compiled (AVX512-BF16)");
}
