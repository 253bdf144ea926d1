// The module's free functions (ops.h): the tensor checks around attention.h's and linear.h's kernels,
// compiled apart from the fused step (llama.cpp) and the C interface (capi.cpp).
#include "ops.h"

#include <chrono>
#include <vector>

#include "attention.h"
#include "linear.h"
#include "team.h"

namespace tailserve {

void linear(const Linear& l, const uint16_t* x, int64_t M, uint16_t* y, int threads) {
  TS_CHECK(M >= 0 && threads >= 1, "bad rows or threads");
  if (M == 0) return;
  InputScratch scratch;
  const Input in = prepare_input(l.pw, x, l.pw.K, M, scratch);
  const StoreBf16 store{y, l.pw.N, l.pw.N};
  Team::instance().run(threads, [&](int tid, int nt) {
    int64_t b, e;
    thread_range(l.pw.blocks(), tid, nt, b, e);
    linear_blocks(l.pw, in, M, b, e, store);
  });
}

void decode_attention(bool bf16, const void* q, const void* k_cache, const void* v_cache, void* out, int64_t N,
                      int64_t H, int64_t D, int64_t Hkv, const int64_t* table, int64_t table_ld,
                      int64_t table_cols, int64_t block_size, const int64_t* lens, double scale, int threads) {
  TS_CHECK(N >= 0 && H > 0 && D > 0 && Hkv > 0 && H % Hkv == 0 && block_size > 0 && threads >= 1, "shape mismatch");
  const int64_t max_ctx = table_cols * block_size;
  for (int64_t n = 0; n < N; ++n) TS_CHECK(lens[n] >= 1 && lens[n] <= max_ctx, "context length out of range");
  const AttentionArgs a(N, H, Hkv, D, table, table_ld, nullptr, block_size, lens, static_cast<float>(scale), threads);
  auto run = [&](auto* qp, auto* kp, auto* vp, auto* op) {
    Team::instance().run(threads, [&](int tid, int nt) {
      int64_t b, e;
      thread_range(a.items(), tid, nt, b, e);
      attention_items(a, qp, kp, vp, op, b, e);
    });
  };
  if (bf16) {
    run(static_cast<const BF16*>(q), static_cast<const BF16*>(k_cache), static_cast<const BF16*>(v_cache),
        static_cast<BF16*>(out));
  } else {
    run(static_cast<const float*>(q), static_cast<const float*>(k_cache), static_cast<const float*>(v_cache),
        static_cast<float*>(out));
  }
}

const char* tier() { return TAILSERVE_TIER; }

// Multiply-adds per second of the tier's two dot products (u8 × s8 → int32, and bf16 pairs → fp32) on
// `threads` threads of the step's team: the compute ceilings benchmarks/ceilings.py reports shares of.
// Eight independent accumulator chains per thread; the weights are loaded from L1 each iteration (as
// the linears load them), so nothing can be hoisted out of the loop.
void peak_macs(int64_t threads, int64_t iters, double* out) {
  using namespace simd;
  constexpr int kChains = 8, kBuf = 8;
  TS_CHECK(threads >= 1 && iters >= 1, "threads and iters must be positive");
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
  out[0] = ops * 64 / int8;
  out[1] = ops * 32 / bf16;
}

}  // namespace tailserve
