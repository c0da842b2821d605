"""Kernel selection for served ARMOR layers.

``VLLM_ARMOR_KERNEL`` (default ``auto``):

* ``dense``: fold A, core and B into one dense weight at load and run vLLM's own unquantized GEMM (oneDNN
  on CPU). Fastest where no 2:4 kernel exists: on SmolLM2-135M (CPU, eager, 128-token decode) it ran
  33.7 tok/s against 32.7 for the dense model, while the factored path ran 14.5 tok/s. Memory as dense.
* ``factored``: keep B, the 2:4 core and A and compute y = A (core (B x)) + bias per call (custom op
  ``vllm_armor::factored_linear``). Slower on CPU; for memory-bound users and a future CPU 2:4 kernel.
* ``sparse24``: factored with the core on 2:4 sparse tensor cores via cuSPARSELt (CUDA sm80+; untested
  on real hardware in this repository).
* ``auto``: ``sparse24`` where supported, else ``dense``.
"""

from __future__ import annotations

import enum
import os

import torch

from vllm_armor.kernels.sparse24 import sparse24_supported

KERNEL_ENV = "VLLM_ARMOR_KERNEL"


class KernelChoice(str, enum.Enum):
    AUTO = "auto"
    DENSE = "dense"
    FACTORED = "factored"
    SPARSE24 = "sparse24"


def requested_kernel() -> KernelChoice:
    raw = os.environ.get(KERNEL_ENV, KernelChoice.AUTO.value).strip().lower()
    try:
        return KernelChoice(raw)
    except ValueError:
        allowed = ", ".join(k.value for k in KernelChoice)
        raise ValueError(f"{KERNEL_ENV}={raw!r} is not one of: {allowed}") from None


def choose_kernel(device: torch.device, requested: KernelChoice | None = None) -> tuple[KernelChoice, str]:
    """Return (kernel, reason) for layers on ``device``."""
    requested = requested or requested_kernel()
    ok, why = sparse24_supported(device)
    if requested is KernelChoice.SPARSE24:
        if not ok:
            raise ValueError(f"{KERNEL_ENV}=sparse24 is not available: {why}")
        return KernelChoice.SPARSE24, why
    if requested is not KernelChoice.AUTO:
        return requested, f"requested by {KERNEL_ENV}"
    if ok:
        return KernelChoice.SPARSE24, why
    return KernelChoice.DENSE, f"no 2:4 kernel ({why}); A·core·B folded to one dense weight"
