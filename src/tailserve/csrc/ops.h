// The module's free functions (ops.cpp), as the C interface (capi.cpp) sees them: the PyTorch path's
// paged attention, the linears one call at a time, and the tier's dot-product ceilings. Each runs on
// `threads` threads of the module's team (team.h), which the caller names (PyTorch's intra-op count).
#pragma once

#include <cstdint>

#include "llama.h"

namespace tailserve {

// Paged attention of one query row per table row: q, out [N, H, D]; caches [blocks, Hkv, block_size, D]
// (flat rows: [slots, Hkv, D]); fp32 or (bf16) bits throughout; table [N, table_cols] at row stride
// table_ld; lens [N] context lengths.
void decode_attention(bool bf16, const void* q, const void* k_cache, const void* v_cache, void* out, int64_t N,
                      int64_t H, int64_t D, int64_t Hkv, const int64_t* table, int64_t table_ld,
                      int64_t table_cols, int64_t block_size, const int64_t* lens, double scale, int threads);
// y [M, N] = x [M, K] @ W.T, both bf16 bits, W the packed weight `l`.
void linear(const Linear& l, const uint16_t* x, int64_t M, uint16_t* y, int threads);
const char* tier();
// The tier's int8 and bf16 dot-product multiply-adds per second: out[0], out[1].
void peak_macs(int64_t threads, int64_t iters, double* out);

}  // namespace tailserve
