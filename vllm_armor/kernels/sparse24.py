"""2:4 sparse tensor-core path through torch's cuSPARSELt bindings (CUDA sm80+).

UNTESTED ON REAL HARDWARE: this repository is developed and tested on CPU only. The path is only taken
when `sparse24_supported()` says so (a CUDA device of capability >= 8.0 and cuSPARSELt in the torch
build); the CPU backend never reaches it. Select it explicitly with VLLM_ARMOR_KERNEL=sparse24 or let
`auto` pick it on such a GPU.
"""

from __future__ import annotations

import torch


def sparse24_supported(device: torch.device) -> tuple[bool, str]:
    """(supported, reason) for the cuSPARSELt 2:4 path on ``device``."""
    if device.type != "cuda":
        return False, f"device is {device.type}, the 2:4 tensor-core path needs CUDA"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"GPU capability {major}.{minor} < 8.0 has no 2:4 sparse tensor cores"
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if cusparselt is None or not cusparselt.is_available():
        return False, "this torch build has no cuSPARSELt"
    return True, f"CUDA capability {major}.{minor} with cuSPARSELt"


def sparse24_shape_ok(d_out: int, d_in: int, dtype: torch.dtype) -> bool:
    """cuSPARSELt constraints on the sparse operand (fp16/bf16, dims multiples of 16 / 64)."""
    return dtype in (torch.float16, torch.bfloat16) and d_out % 16 == 0 and d_in % 64 == 0


def compress_core(dense_core: torch.Tensor) -> torch.Tensor:
    """Compress a dense zero-filled 2:4 core (d_out, d_in) on the GPU for `torch._cslt_sparse_mm`."""
    return torch._cslt_compress(dense_core.contiguous())
