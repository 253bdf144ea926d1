// Small-M linears over weights packed for `vdpbf16ps` (bf16, int8 per channel, int4 group-wise),
// dequantizing in registers so every weight byte is read from memory once per block of rows.
// What happens to each tile's fp32 results is an epilogue: store, add to a residual, or SwiGLU.
#pragma once
#include "common.h"
#include "simd.h"

namespace tailserve {

// Packed weights: blocks of 32 output channels; within a block, K/2 "pair steps", each holding for
// every channel two consecutive k values (vdpbf16ps' operand layout), as two 16-channel halves.
//   bf16: 128 B per pair step (half 0 then half 1);
//   int8: 64 B per pair step, same order, per-channel fp32 scale applied at the end;
//   int4: 32 B per pair step: byte e = half0[e] | half1[e] << 4 (unsigned 0..15), one (scale, min)
//         fp16 pair per channel per group; q is fed to vdpbf16ps as the exact bf16 value 128 + q
//         (bits 0x4300 | q) and the 128·Σx term is folded into the group's offset.
// The VNNI kinds (vpdpbusd: u8 weights × s8 activations, 64 multiply-adds per instruction, twice
// vdpbf16ps' rate) take the input quantized to int8 per row and group of 32 (GGUF's Q8 scheme), and
// hold weights per "quad step" of 4 consecutive k, every channel's 4 bytes in one 32-bit lane:
//   u4: 64 B per quad: byte 4c + j = half0 channel c's q(k + j) | half1's << 4 (0..15);
//   u8: 128 B per quad: half 0 then half 1, each byte w + 128 (w in -127..127).
// Both carry an fp16 (scale d, min m) per channel per group, y = Σ_g d·(s_g·Σ q·a) + m·(s_g·Σ a);
// u8 stores m = -128·d, which takes the +128 back out: GGUF Q8_0 weights, exactly.
enum Kind { kBf16 = 0, kInt8 = 1, kInt4 = 2, kU4 = 3, kU8 = 4 };
constexpr int64_t kBlock = 32;

struct PackedWeight {
  int kind;
  const uint8_t* w;        // packed blocks
  const float* scale;      // int8: [N padded to 32]
  const uint16_t* gscale;  // int4, u4, u8: [blocks, K / group, 2, 32] fp16 bits (scale, min)
  int64_t N, K, group;

  int64_t blocks() const { return (N + kBlock - 1) / kBlock; }
  bool vnni() const { return kind == kU4 || kind == kU8; }
  bool grouped() const { return kind == kInt4 || vnni(); }
  int64_t bytes_per_pair() const {  // per 2 k of a block of 32 channels
    return kind == kBf16 ? 128 : kind == kInt8 || kind == kU8 ? 64 : 32;
  }
};

// A linear's input rows, in the forms its kind reads (prepare_input fills what is needed).
struct Input {
  const uint16_t* x;     // bf16 bits [M, ldx]
  int64_t ldx;
  const float* sums;     // grouped kinds: [M, K / group] sum of each group (VNNI: of the int8 values, rescaled)
  const int8_t* q;       // VNNI: [M, K] the rows in int8, per group
  const float* qscale;   // VNNI: [M, K / group] the groups' scales
};

// Scratch that backs an Input; one per thread.
struct InputScratch {
  std::vector<float> sums, qscale;
  std::vector<int8_t> q;
};

template <int KIND>
inline void load_pair(const uint8_t* w, int64_t p, simd::Pairs& w0, simd::Pairs& w1) {
  using namespace simd;
  if constexpr (KIND == kBf16) {
    const uint8_t* a = w + p * 128;
    w0 = pairs(loadu_i(a));
    w1 = pairs(loadu_i(a + 64));
  } else if constexpr (KIND == kInt8) {
    const int8_t* a = reinterpret_cast<const int8_t*>(w + p * 64);
    w0 = pairs_s8(a);
    w1 = pairs_s8(a + 32);
  } else {  // each 16-bit lane a nibble q as the bf16 bits of 128 + q
    const I b = widen_u8_u16(w + p * 32), nib = set1_i(0x000F000F), base = set1_i(0x43004300);
    w0 = pairs(or_i(and_i(b, nib), base));
    w1 = pairs(or_i(and_i(srli<4>(b), nib), base));
  }
}

// One group's fp16 (scale, min) per channel of block `blk`, widened: channels [0, 16) and [16, 32).
struct GroupScales {
  simd::F d0, d1, m0, m1;
};

inline GroupScales group_scales(const PackedWeight& a, int64_t blk, int64_t groups, int64_t g) {
  const uint16_t* gs = a.gscale + (blk * groups + g) * 64;
  return {simd::load_f16(gs), simd::load_f16(gs + 16), simd::load_f16(gs + 32), simd::load_f16(gs + 48)};
}

// --- epilogues: (row m, block blk, channels blk·32 + [0, 16) in v0 and + [16, 32) in v1) -----------

struct StoreBf16 {  // y[m, n] = v, bf16
  uint16_t* y;
  int64_t ld, N;
  void operator()(int64_t m, int64_t blk, simd::F v0, simd::F v1) const {
    const int64_t n0 = blk * kBlock;
    simd::store_bf16_n(y + m * ld + n0, v0, N - n0);
    simd::store_bf16_n(y + m * ld + n0 + 16, v1, N - n0 - 16);
  }
};

struct StoreF32 {  // y[m, n] = v, fp32
  float* y;
  int64_t ld, N;
  void operator()(int64_t m, int64_t blk, simd::F v0, simd::F v1) const {
    const int64_t n0 = blk * kBlock;
    simd::store_n(y + m * ld + n0, v0, N - n0);
    simd::store_n(y + m * ld + n0 + 16, v1, N - n0 - 16);
  }
};

struct AddF32 {  // y[m, n] += v: the residual connection, fp32
  float* y;
  int64_t ld, N;
  void operator()(int64_t m, int64_t blk, simd::F v0, simd::F v1) const {
    using namespace simd;
    float* r = y + m * ld + blk * kBlock;
    const int64_t n0 = N - blk * kBlock, n1 = n0 - 16;
    store_n(r, add(load_n(r, n0), v0), n0);
    store_n(r + 16, add(load_n(r + 16, n1), v1), n1);
  }
};

// Gate and up weights interleaved in 16-row halves (block b = gate rows 16b.., then up rows 16b..):
// y[m, 16b + i] = silu(gate) · up, bf16, so the MLP's activation never makes a round trip to memory.
struct SwiGlu {
  uint16_t* y;
  int64_t ld, N;  // N: intermediate size
  void operator()(int64_t m, int64_t blk, simd::F gate, simd::F up) const {
    using namespace simd;
    const F silu = div(gate, add(set1(1.f), exp(sub(zero(), gate))));
    store_bf16_n(y + m * ld + blk * 16, mul(silu, up), N - blk * 16);
  }
};

// The same layout with Gemma's GELU (tanh approximation) on the gate: gelu(g) = g · (1 + tanh(u)) / 2
// with u = √(2/π)·(g + 0.044715·g³), which is g / (1 + exp(−2u)), silu's shape with another argument.
struct GeluGlu {
  uint16_t* y;
  int64_t ld, N;
  void operator()(int64_t m, int64_t blk, simd::F gate, simd::F up) const {
    using namespace simd;
    constexpr float c = 1.5957691216057308f;  // 2·√(2/π)
    const F z = mul(gate, fmadd(mul(gate, gate), set1(-c * 0.044715f), set1(-c)));  // −2u
    store_bf16_n(y + m * ld + blk * 16, mul(div(gate, add(set1(1.f), exp(z))), up), N - blk * 16);
  }
};

// y[m, n] = cap · tanh(v / cap), fp32: Gemma's final-logit soft-capping on the head's output, with
// tanh(x) = 1 − 2 / (1 + exp(2x)) (exp saturates, so large |x| give ±1).
struct CappedF32 {
  float* y;
  int64_t ld, N;
  float cap;
  simd::F tanh_cap(simd::F v) const {
    using namespace simd;
    const F e = exp(mul(v, set1(2.f / cap)));
    return mul(set1(cap), sub(set1(1.f), div(set1(2.f), add(set1(1.f), e))));
  }
  void operator()(int64_t m, int64_t blk, simd::F v0, simd::F v1) const {
    const int64_t n0 = blk * kBlock;
    simd::store_n(y + m * ld + n0, tanh_cap(v0), N - n0);
    simd::store_n(y + m * ld + n0 + 16, tanh_cap(v1), N - n0 - 16);
  }
};

// Rows [m0, m0 + MT) of the input × the 32 channels of block `blk`, on bf16 pairs (vdpbf16ps).
template <int KIND, int MT, class Epi>
void linear_tile(const PackedWeight& a, const Input& in, int64_t blk, int64_t m0, const Epi& epi) {
  using namespace simd;
  const int64_t P = a.K / 2;
  const float* xsum = in.sums;
  const uint32_t* xr[MT];
  for (int m = 0; m < MT; ++m) xr[m] = reinterpret_cast<const uint32_t*>(in.x + (m0 + m) * in.ldx);
  F y0[MT], y1[MT];
  for (int m = 0; m < MT; ++m) y0[m] = y1[m] = zero();
  if constexpr (KIND == kInt4) {
    const uint8_t* wb = a.w + blk * P * 32;
    const int64_t groups = a.K / a.group, gp = a.group / 2;
    for (int64_t g = 0; g < groups; ++g) {
      F c0[MT], c1[MT];
      for (int m = 0; m < MT; ++m) c0[m] = c1[m] = zero();
      for (int64_t p = g * gp; p < (g + 1) * gp; ++p) {
        Pairs w0, w1;
        load_pair<KIND>(wb, p, w0, w1);
        for (int m = 0; m < MT; ++m) {
          const Pairs xb = bcast_pair(xr[m][p]);
          c0[m] = dpbf16(c0[m], xb, w0);
          c1[m] = dpbf16(c1[m], xb, w1);
        }
      }
      const GroupScales gs = group_scales(a, blk, groups, g);
      const F k128 = set1(128.f), o0 = fnmadd(k128, gs.d0, gs.m0), o1 = fnmadd(k128, gs.d1, gs.m1);
      for (int m = 0; m < MT; ++m) {
        const F xs = set1(xsum[(m0 + m) * groups + g]);
        y0[m] = fmadd(o0, xs, fmadd(gs.d0, c0[m], y0[m]));
        y1[m] = fmadd(o1, xs, fmadd(gs.d1, c1[m], y1[m]));
      }
    }
  } else {
    const uint8_t* wb = a.w + blk * P * (KIND == kBf16 ? 128 : 64);
    for (int64_t p = 0; p < P; ++p) {
      Pairs w0, w1;
      load_pair<KIND>(wb, p, w0, w1);
      for (int m = 0; m < MT; ++m) {
        const Pairs xb = bcast_pair(xr[m][p]);
        y0[m] = dpbf16(y0[m], xb, w0);
        y1[m] = dpbf16(y1[m], xb, w1);
      }
    }
    if constexpr (KIND == kInt8) {
      const F s0 = loadu(a.scale + blk * kBlock), s1 = loadu(a.scale + blk * kBlock + 16);
      for (int m = 0; m < MT; ++m) {
        y0[m] = mul(y0[m], s0);
        y1[m] = mul(y1[m], s1);
      }
    }
  }
  for (int m = 0; m < MT; ++m) epi(m0 + m, blk, y0[m], y1[m]);
}

// The same on u8 × s8 dot products (vpdpbusd), for the VNNI kinds: int32 sums per group, scaled into
// fp32 at each group's end.
template <int KIND, int MT, class Epi>
void vnni_tile(const PackedWeight& a, const Input& in, int64_t blk, int64_t m0, const Epi& epi) {
  using namespace simd;
  constexpr int64_t kQuadBytes = KIND == kU4 ? 64 : 128;
  const int64_t Q = a.K / 4, groups = a.K / a.group, gq = a.group / 4;
  const uint8_t* wb = a.w + blk * Q * kQuadBytes;
  const int32_t* xr[MT];
  for (int m = 0; m < MT; ++m) xr[m] = reinterpret_cast<const int32_t*>(in.q + (m0 + m) * a.K);
  const I nib = set1_i(0x0F0F0F0F);
  F y0[MT], y1[MT];
  for (int m = 0; m < MT; ++m) y0[m] = y1[m] = zero();
  for (int64_t g = 0; g < groups; ++g) {
    I c0[MT], c1[MT];
    for (int m = 0; m < MT; ++m) c0[m] = c1[m] = zero_i();
    if constexpr (KIND == kU4) {  // nibbles: summed in the narrow accumulator, kNarrowSteps at a time
      for (int64_t p0 = g * gq; p0 < (g + 1) * gq; p0 += kNarrowSteps) {
        I n0[MT], n1[MT];
        for (int m = 0; m < MT; ++m) {
          n0[m] = narrow_begin(c0[m]);
          n1[m] = narrow_begin(c1[m]);
        }
        for (int64_t p = p0; p < std::min(p0 + kNarrowSteps, (g + 1) * gq); ++p) {
          const I v = loadu_i(wb + p * 64), w0 = and_i(v, nib), w1 = and_i(srli<4>(v), nib);
          for (int m = 0; m < MT; ++m) {
            const I xb = set1_i(xr[m][p]);
            n0[m] = narrow_dot(n0[m], w0, xb);
            n1[m] = narrow_dot(n1[m], w1, xb);
          }
        }
        for (int m = 0; m < MT; ++m) {
          c0[m] = narrow_end(c0[m], n0[m]);
          c1[m] = narrow_end(c1[m], n1[m]);
        }
      }
    } else {
      for (int64_t p = g * gq; p < (g + 1) * gq; ++p) {
        const I w0 = loadu_i(wb + p * 128), w1 = loadu_i(wb + p * 128 + 64);
        for (int m = 0; m < MT; ++m) {
          const I xb = set1_i(xr[m][p]);
          c0[m] = dpbusd(c0[m], w0, xb);
          c1[m] = dpbusd(c1[m], w1, xb);
        }
      }
    }
    const GroupScales gs = group_scales(a, blk, groups, g);
    for (int m = 0; m < MT; ++m) {
      const int64_t i = (m0 + m) * groups + g;
      const F s = set1(in.qscale[i]), xs = set1(in.sums[i]);
      y0[m] = fmadd(gs.m0, xs, fmadd(gs.d0, mul(to_f(c0[m]), s), y0[m]));
      y1[m] = fmadd(gs.m1, xs, fmadd(gs.d1, mul(to_f(c1[m]), s), y1[m]));
    }
  }
  for (int m = 0; m < MT; ++m) epi(m0 + m, blk, y0[m], y1[m]);
}

template <int KIND, int MT, class Epi>
void any_tile(const PackedWeight& a, const Input& in, int64_t blk, int64_t m0, const Epi& epi) {
  if constexpr (KIND == kU4 || KIND == kU8) vnni_tile<KIND, MT>(a, in, blk, m0, epi);
  else linear_tile<KIND, MT>(a, in, blk, m0, epi);
}

// All M rows × block `blk`, in tiles of as many rows as the registers hold accumulators for.
// Each row's result is computed in the same order whatever M is: batching never changes a row's numbers.
template <int KIND, class Epi>
void linear_block(const PackedWeight& a, const Input& in, int64_t M, int64_t blk, const Epi& epi) {
  constexpr int64_t kMaxRows = KIND == kBf16 || KIND == kInt8 ? simd::kRowsPairs : simd::kRowsVnni;
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    switch (std::min(kMaxRows, M - m0)) {
      case 1: any_tile<KIND, 1>(a, in, blk, m0, epi); break;
      case 2: any_tile<KIND, 2>(a, in, blk, m0, epi); break;
      case 3: any_tile<KIND, 3>(a, in, blk, m0, epi); break;
      case 4: any_tile<KIND, 4>(a, in, blk, m0, epi); break;
      case 5: if constexpr (kMaxRows > 4) any_tile<KIND, 5>(a, in, blk, m0, epi); break;
      case 6: if constexpr (kMaxRows > 4) any_tile<KIND, 6>(a, in, blk, m0, epi); break;
      case 7: if constexpr (kMaxRows > 4) any_tile<KIND, 7>(a, in, blk, m0, epi); break;
      default: if constexpr (kMaxRows > 4) any_tile<KIND, 8>(a, in, blk, m0, epi); break;
    }
  }
}

// Blocks [b0, b1) of one linear: the unit of work a thread takes.
template <class Epi>
void linear_blocks(const PackedWeight& a, const Input& in, int64_t M, int64_t b0, int64_t b1, const Epi& epi) {
  for (int64_t blk = b0; blk < b1; ++blk) {
    switch (a.kind) {
      case kBf16: linear_block<kBf16>(a, in, M, blk, epi); break;
      case kInt8: linear_block<kInt8>(a, in, M, blk, epi); break;
      case kInt4: linear_block<kInt4>(a, in, M, blk, epi); break;
      case kU4: linear_block<kU4>(a, in, M, blk, epi); break;
      default: linear_block<kU8>(a, in, M, blk, epi); break;
    }
  }
}

// One group of 32 bf16 values → int8 with scale max|x| / 127, rounded to nearest even as std::nearbyint
// does below (the same numbers); writes the scale and the rescaled sum of the int8 values.
inline void quantize_group32(const uint16_t* x, int8_t* q, float* qscale, float* sum) {
  using namespace simd;
  const F a = load_bf16(x), b = load_bf16(x + 16);
  const float amax = reduce_max(max(abs(a), abs(b)));
  const float scale = amax / 127.f;
  const F inv = set1(amax > 0.f ? 127.f / amax : 0.f);
  const I qa = to_i(mul(a, inv)), qb = to_i(mul(b, inv));
  store_s8(q, qa);  // |q| <= 127: no saturation
  store_s8(q + 16, qb);
  *qscale = scale;
  *sum = scale * static_cast<float>(reduce_add_i(add_i(qa, qb)));
}

// Rows [m0, m1) of the input of a linear of kind `a.kind` from x [M, K] (bf16 bits), into `in`'s buffers
// (row-major, sized for M rows): group sums for int4; for the VNNI kinds each group of each row in int8
// (scale max|x| / 127, round to nearest) with the scale and the rescaled sum of the int8 values.
// Per row, independent of the other rows, so threads may share the rows out.
inline void prepare_rows(const PackedWeight& a, const Input& in, int64_t m0, int64_t m1) {
  if (!a.grouped()) return;
  const int64_t K = a.K, G = a.group, groups = K / G;
  float* sums = const_cast<float*>(in.sums);
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      const uint16_t* xg = in.x + m * in.ldx + g * G;
      if (!a.vnni()) {
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < G; ++i) s += simd::bits_to_f(static_cast<uint32_t>(xg[i]) << 16);
        sums[m * groups + g] = s;
        continue;
      }
      int8_t* qg = const_cast<int8_t*>(in.q) + m * K + g * G;
      if (G == 32) {  // GGUF's group: the common case, in registers (the loops below are 2.6x slower)
        quantize_group32(xg, qg, const_cast<float*>(in.qscale) + m * groups + g, sums + m * groups + g);
        continue;
      }
      float amax = 0.f;
#pragma omp simd reduction(max : amax)
      for (int64_t i = 0; i < G; ++i) amax = std::max(amax, std::fabs(simd::bits_to_f(static_cast<uint32_t>(xg[i]) << 16)));
      const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      int32_t total = 0;
#pragma omp simd reduction(+ : total)
      for (int64_t i = 0; i < G; ++i) {
        const int32_t v = static_cast<int32_t>(std::nearbyint(simd::bits_to_f(static_cast<uint32_t>(xg[i]) << 16) * inv));
        qg[i] = static_cast<int8_t>(v);
        total += v;
      }
      const_cast<float*>(in.qscale)[m * groups + g] = scale;
      sums[m * groups + g] = scale * static_cast<float>(total);
    }
}

// An Input over x whose buffers are `scratch`'s as they are (big enough for the rows to prepare).
inline Input input_view(const PackedWeight& a, const uint16_t* x, int64_t ldx, InputScratch& scratch) {
  return Input{x, ldx, a.grouped() ? scratch.sums.data() : nullptr, a.vnni() ? scratch.q.data() : nullptr,
               a.vnni() ? scratch.qscale.data() : nullptr};
}

// Sizes `scratch` for M rows of a linear's input.
inline void size_scratch(const PackedWeight& a, int64_t M, InputScratch& scratch) {
  if (!a.grouped()) return;
  const int64_t groups = a.K / a.group;
  scratch.sums.resize(std::max<size_t>(scratch.sums.size(), M * groups));
  if (a.vnni()) {
    scratch.qscale.resize(std::max<size_t>(scratch.qscale.size(), M * groups));
    scratch.q.resize(std::max<size_t>(scratch.q.size(), M * a.K));
  }
}

// The whole input of a linear, prepared by the calling thread alone.
inline Input prepare_input(const PackedWeight& a, const uint16_t* x, int64_t ldx, int64_t M, InputScratch& scratch) {
  size_scratch(a, M, scratch);
  const Input in = input_view(a, x, ldx, scratch);
  prepare_rows(a, in, 0, M);
  return in;
}

}  // namespace tailserve
