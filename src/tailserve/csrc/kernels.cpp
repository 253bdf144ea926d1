// CPU kernels for the hot path, where PyTorch's generic ops lose most of the memory bandwidth and,
// on a small model, most of the time to per-op dispatch:
//  - paged attention (attention.h): reads each row's K/V straight from the paged pool (no gather copy,
//    no padding to the longest context), online softmax, fp32 accumulation;
//  - small-M linears (linear.h) over packed weights (bf16 pairs, int8 per channel, int4 group-wise, and
//    int4/int8 per group on u8 × s8 dot products), dequantizing in registers;
//  - the fused decoder step (llama.h): the whole model over a flat batch in one call.
// The linears and the fused step are written over simd.h, so one source builds for every CPU tier
// (layers/kernels.py compiles one module per tier; `tier()` says which). Every entry point releases
// the GIL while it computes.
// This file is the module's bindings alone; the kernels compile in translation units of their own
// (llama.cpp: the fused step; ops.cpp: the single ops), which ninja builds in parallel. Only this one
// parses pybind11 and PyTorch's tensor caster (torch/csrc/utils/pybind.h: a third of the time of
// torch/extension.h, which drags in the whole C++ API); the others include ATen's tensor alone.
#include <torch/csrc/utils/pybind.h>

#include "llama.h"
#include "ops.h"

using namespace tailserve;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("decode_attention", &decode_attention, "paged attention of one query row per table row", nogil);
  m.def("argmax_rows", &argmax_rows, "first index of each row's maximum, fp32 [rows, n]", nogil);
  m.def("linear_bf16", &linear_bf16, "x @ W.T for block-packed bf16 W", nogil);
  m.def("linear_int8", &linear_int8, "x @ W.T for block-packed int8 W with per-channel scales", nogil);
  m.def("linear_int4", &linear_int4, "x @ W.T for block-packed int4 W with per-group scale and min", nogil);
  m.def("linear_vnni", &linear_vnni, "x @ W.T on u8 x s8 dot products for VNNI-packed int4/int8 W, x in int8 per group",
        nogil);
  m.def("tier", &tier, "the CPU tier these kernels were compiled for (simd.h)");
  m.def("peak_macs", &peak_macs, "the tier's int8 and bf16 dot-product multiply-adds per second", nogil);
  // Module-local: each tier's module (tests load several in one process) has classes of the same C++
  // names (tailserve::Linear), which pybind11 would otherwise take for one type registered twice.
  py::class_<Linear>(m, "Linear", py::module_local(),
                     "a packed weight: (kind 0 bf16 | 1 int8 | 2 int4, packed, scales, n, k, group)")
      .def(py::init<int64_t, at::Tensor, at::Tensor, int64_t, int64_t, int64_t>());
  py::class_<Llama>(m, "Llama", py::module_local(), "the fused decoder step (llama.h)")
      .def(py::init<int64_t, int64_t, int64_t, double, at::Tensor, at::Tensor, Linear, at::Tensor,
                    at::Tensor>())
      .def("add_layer", &Llama::add_layer)
      .def("set_family", &Llama::set_family)
      .def("set_layer_options", &Llama::set_layer_options)
      .def("set_draft_head", &Llama::set_draft_head)
      .def("set_threads", &Llama::set_threads)
      .def("forward", &Llama::forward, nogil)
      .def("forward_split", &Llama::forward_split, nogil)
      .def("take_phase_seconds", &Llama::take_phase_seconds);
}
