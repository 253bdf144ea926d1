"""Makes vLLM's CPU build choose what it would choose on an AVX2-only CPU, on a machine with more.

Put on PYTHONPATH (with ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2, which cap PyTorch's own
kernels and oneDNN's GEMMs) for every process vLLM starts: vLLM picks its kernel library (`_C_AVX2`,
`_C_AVX512` or `_C`) and attention path from `torch.cpu._is_avx512*_supported()`, which read the
hardware and ignore both variables. Python runs sitecustomize in each process, spawned workers too."""

import torch.cpu

for _probe in (
    "_is_avx512_supported",
    "_is_avx512_bf16_supported",
    "_is_avx512_vnni_supported",
    "_is_amx_tile_supported",
    "_is_amx_fp16_supported",
):
    if hasattr(torch.cpu, _probe):
        setattr(torch.cpu, _probe, lambda: False)
