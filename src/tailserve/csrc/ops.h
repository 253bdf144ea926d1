// The module's free functions (ops.cpp), as the bindings (kernels.cpp) see them: the PyTorch path's
// paged attention and argmax, the linears one call at a time, and the tier's dot-product ceilings.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <string>

namespace tailserve {

at::Tensor decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor table,
                            int64_t block_size, at::Tensor lens, double scale);
at::Tensor argmax_rows(at::Tensor x);
at::Tensor linear_vnni(at::Tensor x, int64_t kind, at::Tensor w, at::Tensor gscale, int64_t n, int64_t group);
at::Tensor linear_bf16(at::Tensor x, at::Tensor w, int64_t n);
at::Tensor linear_int8(at::Tensor x, at::Tensor w, at::Tensor scale, int64_t n);
at::Tensor linear_int4(at::Tensor x, at::Tensor w, at::Tensor gscale, int64_t n, int64_t group);
std::string tier();
std::map<std::string, double> peak_macs(int64_t threads, int64_t iters);

}  // namespace tailserve
