// Paged attention over a flat KV pool (see layers/attention.py for the layout).
#pragma once
#include "common.h"
#include "simd.h"

namespace tailserve {

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
#endif


// Online-softmax step for one query head's tile of scores: s ← exp(s − m'), returns Σ exp and sets
// m ← m' = max(m, max s), alpha ← exp(m − m') (the rescale of what was accumulated before).
inline float softmax_tile(float* s, int64_t nt, float& m, float& alpha) {
  using namespace simd;
  static_assert(kTokenTile == 32, "two 16-lane vectors per tile");
  const F ninf = set1(-std::numeric_limits<float>::infinity());
  const F a = select_first(nt, load_n(s, nt), ninf), b = select_first(nt - 16, load_n(s + 16, nt - 16), ninf);
  const float mnew = std::max(m, reduce_max(max(a, b)));
  const F mv = set1(mnew);
  const F ea = select_first(nt, exp(sub(a, mv)), zero()), eb = select_first(nt - 16, exp(sub(b, mv)), zero());
  storeu(s, ea);
  storeu(s + 16, eb);
  alpha = fast_exp(m - mnew);
  m = mnew;
  return reduce_add(add(ea, eb));
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

// Where a flat batch's query rows find their keys. Row n attends to tokens [0, lens[n]) of the
// sequence whose block table is table[seq(n)], seq(n) = row_seq[n] (or n when row_seq is null); token
// t lives in slot table[seq][t / block_size] * block_size + t % block_size (block_size 1: the table
// lists slots). A decode is one row; a prefill chunk is one row per token, each with lens = its
// position + 1, which is causal attention over the cached context and the chunk itself.
struct AttentionArgs {
  int64_t N, H, Hkv, D;
  int64_t q_stride, out_stride;  // elements from one row of q (out) to the next
  const int64_t* table;
  int64_t table_stride;
  const int64_t* row_seq;
  int64_t block_size;
  const int64_t* lens;
  float scale;
  int64_t hp;  // KV heads per work item: all of them when rows are many enough to keep threads busy

  AttentionArgs(int64_t N_, int64_t H_, int64_t Hkv_, int64_t D_, const int64_t* table_, int64_t table_stride_,
                const int64_t* row_seq_, int64_t block_size_, const int64_t* lens_, float scale_, int64_t threads)
      : N(N_), H(H_), Hkv(Hkv_), D(D_), q_stride(H_ * D_), out_stride(H_ * D_), table(table_),
        table_stride(table_stride_), row_seq(row_seq_), block_size(block_size_), lens(lens_), scale(scale_),
        hp(N_ >= 2 * threads ? Hkv_ : 1) {}

  int64_t items() const { return N * (Hkv / hp); }
};

// Work items [begin, end): an item is a row and `hp` of its KV heads (with all of them, each token's
// K/V slot is read as one contiguous run); it streams the row's context once, in tiles, with an online
// softmax per query head. Each row's result depends on nothing but its own inputs, so a sequence
// computes the same numbers whether it runs alone, batched, or chunked.
template <typename TQ, typename T, typename TO>
void attention_items(const AttentionArgs& a, const TQ* q, const T* kc, const T* vc, TO* out, int64_t begin,
                     int64_t end) {
  const int64_t H = a.H, Hkv = a.Hkv, D = a.D, hp = a.hp, G = H / Hkv, bs = a.block_size;
  const int64_t splits = Hkv / hp;
  std::vector<float> qf(hp * G * D), acc(hp * G * D), s(G * kTokenTile), mx(hp * G), sum(hp * G);
  int64_t base[kTokenTile];
  const int64_t span_bytes = hp * D * static_cast<int64_t>(sizeof(T));
  const T* kp[kTokenTile];
  const T* vp[kTokenTile];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / splits, h0 = item % splits * hp, ctx = a.lens[n];
    const int64_t* row = a.table + (a.row_seq ? a.row_seq[n] : n) * a.table_stride;
    const TQ* qn = q + n * a.q_stride + h0 * G * D;
    for (int64_t i = 0; i < hp * G * D; ++i) qf[i] = load_f(qn[i]) * a.scale;
    std::fill(acc.begin(), acc.end(), 0.f);
    std::fill(mx.begin(), mx.end(), -std::numeric_limits<float>::infinity());
    std::fill(sum.begin(), sum.end(), 0.f);
    for (int64_t t0 = 0; t0 < ctx; t0 += kTokenTile) {
      const int64_t nt = std::min(kTokenTile, ctx - t0);
      for (int64_t j = 0; j < nt; ++j) {
        const int64_t t = t0 + j;
        base[j] = ((row[t / bs] * bs + t % bs) * Hkv + h0) * D;
      }
      // Rows of consecutive tiles lie in scattered blocks that the hardware prefetcher cannot
      // foresee: request the next tile's K/V while this one computes, so DRAM misses overlap.
      for (int64_t t = t0 + kTokenTile; t < std::min(ctx, t0 + 2 * kTokenTile); ++t) {
        const int64_t off = ((row[t / bs] * bs + t % bs) * Hkv + h0) * D;
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
    TO* on = out + n * a.out_stride + h0 * G * D;
    for (int64_t i = 0; i < hp * G; ++i) {
      const float inv = sum[i] > 0.f ? 1.f / sum[i] : 0.f;
      for (int64_t d = 0; d < D; ++d) on[i * D + d] = static_cast<TO>(acc[i * D + d] * inv);
    }
  }
}

// The fused step's KV layout, built for bf16 pair dot products: per layer [num_blocks, Hkv, bs, D] bf16,
// where each (block, KV head) holds K as [D/2][bs][2] (one pair of dims of 16 tokens is one 16-lane
// vector of pairs) and V as [bs/2][D][2] (16 dims of one pair of tokens is one). bs is a multiple of 16.
inline int64_t k_index(int64_t o, int64_t d, int64_t bs) { return ((d >> 1) * bs + o) * 2 + (d & 1); }
inline int64_t v_index(int64_t o, int64_t d, int64_t D) { return ((o >> 1) * D + d) * 2 + (o & 1); }

constexpr int64_t kMaxPairGroup = 8;  // query heads per KV head the pair kernel holds
constexpr int64_t kAhead = 3;        // tiles of 16 tokens the pair kernel prefetches ahead

struct PairAttentionArgs {
  int64_t H, Hkv, D, bs;
  const float* q;  // [N, q_stride]: row n's query heads at q + n·q_stride, fp32
  int64_t q_stride;
  const uint16_t* kc;
  const uint16_t* vc;
  const int64_t* table;
  int64_t table_stride;
  const int64_t* row_seq;  // row → table row
  const int64_t* lens;     // row → tokens attended (causal: position + 1)
  float scale;
  uint16_t* out;  // [N, out_stride] bf16
  int64_t out_stride;
  const int64_t* starts = nullptr;  // row → first token attended (a sliding window); null: token 0
};

// Row n, KV head h: the G query heads of h over the row's context, 16 tokens at a time, with an online
// softmax. Scores and the value sum are both bf16 pair dot products (q and the probabilities rounded
// to bf16, fp32 accumulation), reading each K/V byte once per row. G and D are compile-time constants
// so the G queries' dependency chains interleave: the kernel is throughput-bound, not latency-bound.
// A row's numbers depend only on the row.
template <int G, int DC>
void pair_attention_item(const PairAttentionArgs& a, int64_t n, int64_t h) {
  using namespace simd;
  constexpr int64_t D = 16 * DC, P = D / 2;
  const int64_t bs = a.bs, ctx = a.lens[n], head_stride = bs * D;
  // A sliding window starts inside some tile: its tiles from that one, the tokens before it masked.
  const int64_t first = a.starts ? a.starts[n] : 0, t_begin = first / 16 * 16;
  const int64_t* row = a.table + a.row_seq[n] * a.table_stride;
  alignas(64) uint32_t qp[G][P];  // q as bf16 pairs, what the dot product broadcasts
  alignas(64) uint16_t ep[G][16];  // a tile's probabilities in bf16: pair i = tokens 2i, 2i + 1
  F acc[G][DC], sum[G];  // sum: the softmax denominators, lane-wise (reduced once, at the end)
  float mx[G];
  for (int g = 0; g < G; ++g) {
    const float* qg = a.q + n * a.q_stride + (h * G + g) * D;
    for (int64_t p = 0; p < P; ++p)
      qp[g][p] = static_cast<uint32_t>(bf16_round(qg[2 * p])) | static_cast<uint32_t>(bf16_round(qg[2 * p + 1])) << 16;
    for (int c = 0; c < DC; ++c) acc[g][c] = zero();
    mx[g] = -std::numeric_limits<float>::infinity();
    sum[g] = zero();
  }
  const F scale = set1(a.scale), ninf = set1(-std::numeric_limits<float>::infinity());
  // Tiles lie in scattered blocks where no hardware prefetcher would look: request them kAhead tiles
  // before they are used, so the misses of a decode row's own (uncached) tokens overlap.
  auto prefetch_tile = [&](int64_t t1) {
    const int64_t next = (row[t1 / bs] * a.Hkv + h) * head_stride;
    const char* kn = reinterpret_cast<const char*>(a.kc + next + t1 % bs * 2);
    const char* vn = reinterpret_cast<const char*>(a.vc + next + t1 % bs * D);
    for (int64_t p = 0; p < P; ++p) __builtin_prefetch(kn + p * bs * 4);
    for (int64_t i = 0; i < D * 32 / 64; ++i) __builtin_prefetch(vn + i * 64);
  };
  for (int64_t t1 = t_begin + 16; t1 < std::min<int64_t>(ctx, t_begin + 16 * kAhead); t1 += 16) prefetch_tile(t1);
  for (int64_t t0 = t_begin; t0 < ctx; t0 += 16) {
    const int64_t base = (row[t0 / bs] * a.Hkv + h) * head_stride, o0 = t0 % bs;
    const uint16_t* kb = a.kc + base + o0 * 2;
    const uint16_t* vb = a.vc + base + o0 * D;
    const int64_t valid = std::min<int64_t>(16, ctx - t0), skip = first - t0;  // skip > 0: lanes before the window
    if (t0 + 16 * kAhead < ctx) prefetch_tile(t0 + 16 * kAhead);
    F s0[G], s1[G];
    for (int g = 0; g < G; ++g) s0[g] = s1[g] = zero();
    for (int64_t p = 0; p < P; p += 2) {
      const Pairs k0 = pairs(loadu_i(kb + p * bs * 2)), k1 = pairs(loadu_i(kb + (p + 1) * bs * 2));
      for (int g = 0; g < G; ++g) {
        s0[g] = dpbf16(s0[g], bcast_pair(qp[g][p]), k0);
        s1[g] = dpbf16(s1[g], bcast_pair(qp[g][p + 1]), k1);
      }
    }
    for (int g = 0; g < G; ++g) {
      F s = select_first(valid, mul(add(s0[g], s1[g]), scale), ninf);
      if (skip > 0) s = select_first(skip, ninf, s);
      const float tile_max = reduce_max(s);
      if (tile_max > mx[g]) {  // a new maximum: rescale what was accumulated (0 on the first tile)
        const F av = set1(fast_exp(mx[g] - tile_max));
        for (int c = 0; c < DC; ++c) acc[g][c] = mul(acc[g][c], av);
        sum[g] = mul(sum[g], av);
        mx[g] = tile_max;
      }
      F e = select_first(valid, exp(sub(s, set1(mx[g]))), zero());
      if (skip > 0) e = select_first(skip, zero(), e);
      sum[g] = add(sum[g], e);
      store_bf16(ep[g], e);
    }
    for (int64_t i = 0; i < (valid + 1) / 2; ++i) {
      const uint16_t* vr = vb + i * D * 2;
      Pairs eg[G];
      for (int g = 0; g < G; ++g) {
        uint32_t pr;
        std::memcpy(&pr, &ep[g][2 * i], sizeof pr);
        eg[g] = bcast_pair(pr);
      }
      for (int c = 0; c < DC; ++c) {
        const Pairs v = pairs(loadu_i(vr + c * 32));
        for (int g = 0; g < G; ++g) acc[g][c] = dpbf16(acc[g][c], eg[g], v);
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const float total = reduce_add(sum[g]);
    const F inv = set1(total > 0.f ? 1.f / total : 0.f);
    uint16_t* og = a.out + n * a.out_stride + (h * G + g) * D;
    for (int c = 0; c < DC; ++c) store_bf16(og + 16 * c, mul(acc[g][c], inv));
  }
}

template <int G>
void pair_attention_item_g(const PairAttentionArgs& a, int64_t n, int64_t h) {
  switch (a.D) {
    case 16: return pair_attention_item<G, 1>(a, n, h);
    case 32: return pair_attention_item<G, 2>(a, n, h);
    case 64: return pair_attention_item<G, 4>(a, n, h);
    case 128: return pair_attention_item<G, 8>(a, n, h);
    default: return pair_attention_item<G, 16>(a, n, h);  // 256 (the model checks the choices)
  }
}

// Items [begin, end) of N rows × Hkv heads.
inline void pair_attention_items(const PairAttentionArgs& a, int64_t begin, int64_t end) {
  using Item = void (*)(const PairAttentionArgs&, int64_t, int64_t);
  static constexpr Item by_group[kMaxPairGroup] = {
      pair_attention_item_g<1>, pair_attention_item_g<2>, pair_attention_item_g<3>, pair_attention_item_g<4>,
      pair_attention_item_g<5>, pair_attention_item_g<6>, pair_attention_item_g<7>, pair_attention_item_g<8>};
  const Item item_fn = by_group[a.H / a.Hkv - 1];
  for (int64_t item = begin; item < end; ++item) item_fn(a, item / a.Hkv, item % a.Hkv);
}

}  // namespace tailserve
