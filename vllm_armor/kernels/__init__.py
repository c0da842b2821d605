"""Kernels of the ARMOR linear layer, shared by the vLLM plugin and the offline `ArmorLinear`; importable
without vLLM.

Every kernel is one class (interface in `base.py`) in its own file; `KERNELS` is the ordered list that
``VLLM_ARMOR_KERNEL=auto`` (the default) walks, taking the first kernel that can implement a layer:

* ``sparse24`` (`sparse24.py`): 2:4 core on sparse tensor cores via cuSPARSELt (CUDA sm80+).
* ``sparse24_cpu`` (`sparse24_cpu.py`): the 2:4 core kept compressed and run by a C++ AVX-512 BF16 kernel
  that multiplies only the kept weights (bf16 layers on x86 CPUs with AVX512-BF16 and VBMI2, where the kernel
  builds; `cpu_build.py`). Holds no dense copy; speed against vLLM's dense GEMM in docs/BENCHMARKS.md.
* ``dense`` (`dense.py`): A·core·B folded to one dense weight at load, plain GEMM. On SmolLM2-135M (CPU,
  eager, 128-token decode) it ran 33.7 tok/s against 32.7 for the dense model; the factored path 14.5.
* ``factored`` (`factored.py`): A, the 2:4 core and B kept apart (never picked by ``auto``: ``dense`` before
  it always can). Forced by ``VLLM_ARMOR_KERNEL=factored``.

A new kernel = one new file plus one entry in `KERNELS`.
"""

from __future__ import annotations

import os

from vllm_armor.kernels.base import ArmorKernel, LayerSpec
from vllm_armor.kernels.dense import DenseFoldKernel
from vllm_armor.kernels.factored import FactoredKernel, factored_forward
from vllm_armor.kernels.sparse24 import Sparse24Kernel
from vllm_armor.kernels.sparse24_cpu import Sparse24CpuKernel

KERNEL_ENV = "VLLM_ARMOR_KERNEL"
AUTO = "auto"
KERNELS: tuple[type[ArmorKernel], ...] = (Sparse24Kernel, Sparse24CpuKernel, DenseFoldKernel, FactoredKernel)

__all__ = ["AUTO", "KERNELS", "KERNEL_ENV", "ArmorKernel", "LayerSpec", "choose_kernel", "compile_key",
           "factored_forward", "requested_kernel"]


def requested_kernel() -> str:
    """The kernel asked for by ``VLLM_ARMOR_KERNEL`` (``auto`` when unset); an unknown name is an error."""
    raw = os.environ.get(KERNEL_ENV, AUTO).strip().lower()
    allowed = (AUTO, *(k.name for k in KERNELS))
    if raw not in allowed:
        raise ValueError(f"{KERNEL_ENV}={raw!r} is not one of: {', '.join(allowed)}")
    return raw


def compile_key(cpu: bool) -> str:
    """What the traced graph depends on: the requested kernel and, under ``auto`` on a CPU platform, whether
    the CPU 2:4 kernel is available (it builds or loads it, cached)."""
    requested = os.environ.get(KERNEL_ENV, AUTO).strip().lower()
    if requested != AUTO or not cpu:
        return requested
    from vllm_armor.kernels.sparse24_cpu import available

    return f"{AUTO}+{Sparse24CpuKernel.name}" if available()[0] else AUTO


def _auto(spec: LayerSpec) -> tuple[type[ArmorKernel], str]:
    rejected = []
    for kernel in KERNELS:
        ok, why = kernel.can_implement(spec)
        if ok:
            reason = why if not rejected else f"{kernel.description}; " + "; ".join(rejected)
            return kernel, reason
        rejected.append(f"not {kernel.name}: {why}")
    raise ValueError(f"no ARMOR kernel can run this layer ({'; '.join(rejected)})")


def choose_kernel(spec: LayerSpec, requested: str | None = None) -> tuple[type[ArmorKernel], str]:
    """(kernel class, reason) for a layer. A requested kernel that cannot run on the device is an error; one
    that cannot run this particular layer (shape, dtype) leaves the layer to ``auto``."""
    requested = requested or requested_kernel()
    if requested == AUTO:
        return _auto(spec)
    kernel = next(k for k in KERNELS if k.name == requested)
    ok, why = kernel.supports_device(spec.device)
    if not ok:
        raise ValueError(f"{KERNEL_ENV}={requested} is not available: {why}")
    ok, why = kernel.can_implement(spec)
    if ok:
        return kernel, f"requested by {KERNEL_ENV}"
    fallback, reason = _auto(spec)
    return fallback, f"{KERNEL_ENV}={requested} cannot run this layer ({why}); {reason}"
