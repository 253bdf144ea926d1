// The module's free functions (ops.h): the tensor checks around attention.h's and linear.h's kernels,
// compiled apart from the fused step (llama.cpp) and the bindings (kernels.cpp).
#include "ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <chrono>
#include <vector>

#include "attention.h"
#include "linear.h"
#include "llama.h"
#include "team.h"

namespace tailserve {

namespace {

at::Tensor linear(const Linear& l, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.dim() == 2 && x.size(1) == l.pw.K,
              "x must be contiguous bf16 [M, in_features]");
  const int64_t M = x.size(0), K = l.pw.K;
  auto y = at::empty({M, l.pw.N}, x.options());
  if (M == 0) return y;
  InputScratch scratch;
  const Input in = prepare_input(l.pw, reinterpret_cast<const uint16_t*>(x.data_ptr()), K, M, scratch);
  const StoreBf16 store{reinterpret_cast<uint16_t*>(y.data_ptr()), l.pw.N, l.pw.N};
  at::parallel_for(0, l.pw.blocks(), 1, [&](int64_t b0, int64_t b1) { linear_blocks(l.pw, in, M, b0, b1, store); });
  return y;
}

}  // namespace

at::Tensor decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor table,
                            int64_t block_size, at::Tensor lens, double scale) {
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
  auto out = at::empty_like(q);
  const AttentionArgs a(N, H, Hkv, D, table.data_ptr<int64_t>(), table.stride(0), nullptr, block_size, lp,
                        static_cast<float>(scale), at::get_num_threads());
  auto run = [&](auto* qp, auto* kp, auto* vp, auto* op) {
    at::parallel_for(0, a.items(), 1, [&](int64_t b, int64_t e) { attention_items(a, qp, kp, vp, op, b, e); });
  };
  if (q.scalar_type() == at::kFloat) {
    run(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), out.data_ptr<float>());
  } else {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, "decode_attention supports float32 and bfloat16");
    using B = c10::BFloat16;
    run(q.data_ptr<B>(), k_cache.data_ptr<B>(), v_cache.data_ptr<B>(), out.data_ptr<B>());
  }
  return out;
}

// Index of each row's largest value (the first, on ties: as torch.argmax). PyTorch's argmax reads
// ~1.5 GB/s here; a greedy step over 16 × 49k logits spent 0.5 ms in it, this takes ~0.1 ms on one
// thread (deliberately one: an OpenMP team woken here would spin against the fused step's team).
at::Tensor argmax_rows(at::Tensor x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1 && x.size(1) > 0,
              "argmax_rows takes fp32 [rows, n] with unit column stride");
  const int64_t R = x.size(0), N = x.size(1), ld = x.stride(0);
  auto out = at::empty({R}, at::kLong);
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    const float* row = xp + r * ld;
    float best = row[0];
    int64_t at = 0, i = 0;
#if defined(__AVX512F__)
    if (N >= 16) {
      __m512 vbest = _mm512_loadu_ps(row);
      __m512i vidx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), vat = vidx;
      const __m512i step = _mm512_set1_epi32(16);
      for (i = 16; i + 16 <= N; i += 16) {
        vidx = _mm512_add_epi32(vidx, step);
        const __m512 v = _mm512_loadu_ps(row + i);
        const __mmask16 gt = _mm512_cmp_ps_mask(v, vbest, _CMP_GT_OQ);  // strict: a lane keeps its first max
        vbest = _mm512_mask_mov_ps(vbest, gt, v);
        vat = _mm512_mask_mov_epi32(vat, gt, vidx);
      }
      alignas(64) float bv[16];
      alignas(64) int32_t bi[16];
      _mm512_store_ps(bv, vbest);
      _mm512_store_si512(bi, vat);
      best = bv[0];
      at = bi[0];
      for (int l = 1; l < 16; ++l)
        if (bv[l] > best || (bv[l] == best && bi[l] < at)) best = bv[l], at = bi[l];
    }
#endif
    for (; i < N; ++i)
      if (row[i] > best) best = row[i], at = i;
    op[r] = at;
  }
  return out;
}

// x @ W.T for a VNNI-packed W (kind 3: int4, 4: int8 per group), x quantized to int8 per row and group.
at::Tensor linear_vnni(at::Tensor x, int64_t kind, at::Tensor w, at::Tensor gscale, int64_t n,
                          int64_t group) {
  TORCH_CHECK(kind == kU4 || kind == kU8, "linear_vnni takes kind 3 (int4) or 4 (int8)");
  return linear(Linear(kind, w, gscale, n, x.size(1), group), x);
}

at::Tensor linear_bf16(at::Tensor x, at::Tensor w, int64_t n) {
  return linear(Linear(kBf16, w, at::Tensor(), n, x.size(1), 0), x);
}

at::Tensor linear_int8(at::Tensor x, at::Tensor w, at::Tensor scale, int64_t n) {
  return linear(Linear(kInt8, w, scale, n, x.size(1), 0), x);
}

at::Tensor linear_int4(at::Tensor x, at::Tensor w, at::Tensor gscale, int64_t n, int64_t group) {
  return linear(Linear(kInt4, w, gscale, n, x.size(1), group), x);
}

std::string tier() { return TAILSERVE_TIER; }

// Multiply-adds per second of the tier's two dot products (u8 × s8 → int32, and bf16 pairs → fp32) on
// `threads` threads of the step's team: the compute ceilings benchmarks/ceilings.py reports shares of.
// Eight independent accumulator chains per thread; the weights are loaded from L1 each iteration (as
// the linears load them), so nothing can be hoisted out of the loop.
std::map<std::string, double> peak_macs(int64_t threads, int64_t iters) {
  using namespace simd;
  constexpr int kChains = 8, kBuf = 8;
  TORCH_CHECK(threads >= 1 && iters >= 1, "threads and iters must be positive");
  std::vector<uint8_t> buf(kBuf * 64);
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<uint8_t>(i * 7 % 16);
  std::vector<double> sink(threads);
  auto timed = [&](auto body) {
    const auto t0 = std::chrono::steady_clock::now();
    Team::instance().run(static_cast<int>(threads), [&](int tid, int) { sink[tid] += body(tid); });
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  const double int8 = timed([&](int tid) {
    I acc[kChains];
    for (int j = 0; j < kChains; ++j) acc[j] = set1_i(j + tid);
    I x[kChains];  // one input per chain: the products cannot be shared between chains
    for (int j = 0; j < kChains; ++j) x[j] = set1_i(0x05F90307 + j);
    const uint8_t* base = buf.data();
    for (int64_t i0 = 0; i0 < iters; i0 += kNarrowSteps) {  // as the int4 linears sum (linear.h)
      // The weights "may have changed": where the dot product is not one instruction taking the
      // accumulator (vpmaddubsw + add), the compiler would otherwise hoist the products out of the loop.
      asm volatile("" : "+r"(base));
      I n[kChains];
      for (int j = 0; j < kChains; ++j) n[j] = narrow_begin(acc[j]);
      for (int64_t i = i0; i < i0 + kNarrowSteps; ++i) {
        const I w = loadu_i(base + (i % kBuf) * 64);
        for (int j = 0; j < kChains; ++j) n[j] = narrow_dot(n[j], w, x[j]);
      }
      for (int j = 0; j < kChains; ++j) acc[j] = narrow_end(acc[j], n[j]);
    }
    for (int j = 1; j < kChains; ++j) acc[0] = add_i(acc[0], acc[j]);
    return static_cast<double>(reduce_add_i(acc[0]));
  });
  const double bf16 = timed([&](int tid) {
    F acc[kChains];
    for (int j = 0; j < kChains; ++j) acc[j] = set1(static_cast<float>(j + tid));
    const Pairs x = bcast_pair(0x3F803F80u);
    const uint8_t* base = buf.data();
    for (int64_t i = 0; i < iters; ++i) {
      asm volatile("" : "+r"(base));  // as above: the widening of the weights stays in the loop
      const Pairs w = pairs(loadu_i(base + (i % kBuf) * 64));
      for (int j = 0; j < kChains; ++j) acc[j] = dpbf16(acc[j], x, w);
    }
    for (int j = 1; j < kChains; ++j) acc[0] = add(acc[0], acc[j]);
    return static_cast<double>(reduce_add(acc[0]));
  });
  const double ops = static_cast<double>(threads) * ((iters + kNarrowSteps - 1) / kNarrowSteps * kNarrowSteps) * kChains;
  return {{"int8_macs_per_s", ops * 64 / int8}, {"bf16_macs_per_s", ops * 32 / bf16}};
}

}  // namespace tailserve
