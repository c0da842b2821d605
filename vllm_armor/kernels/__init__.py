"""Kernels of the ARMOR linear layer, shared by the vLLM plugin and the offline `ArmorLinear`; importable
without vLLM.

Every kernel is one class (interface in `base.py`) in its own file; `KERNELS` is the ordered list that
``VLLM_ARMOR_KERNEL=auto`` (the default) walks, taking the first kernel that can implement a layer:

* ``triton24`` (`triton24.py`): the 2:4 core kept compressed on NVIDIA GPUs (sm80+), Triton kernels that read
  only the kept values and their 4-bit patterns: a gather GEMV for decode, a tile kernel on ``tl.dot`` for
  prefill, A and B one launch each. Correct in Triton's interpreter on CPU; not yet run on a GPU.
* ``sparse24`` (`sparse24.py`): 2:4 core on sparse tensor cores via cuSPARSELt (CUDA sm80+); never run.
* ``sparse24_cpu`` (`sparse24_cpu.py`): the 2:4 core kept compressed and run by a C++ AVX-512 BF16 kernel
  that multiplies only the kept weights (bf16 layers on x86 CPUs with AVX512-BF16 and VBMI2, where the kernel
  builds; `cpu_build.py`). Holds no dense copy; speed against vLLM's dense GEMM in docs/BENCHMARKS.md.
* ``dense`` (`dense.py`): A·core·B folded to one dense weight at load, plain GEMM. On SmolLM2-135M (CPU,
  eager, 128-token decode) it ran 33.7 tok/s against 32.7 for the dense model; the factored path 14.5.
* ``factored`` (`factored.py`): A, the 2:4 core and B kept apart (never picked by ``auto``: ``dense`` before
  it always can). Forced by ``VLLM_ARMOR_KERNEL=factored``.

A new kernel = one new file plus one entry in `KERNELS`. `build_kernel` builds the chosen kernel on a layer; one
that fails there (e.g. a GPU kernel that does not compile or fails its load-time self-check) leaves the layer to
the next kernel of the list that can run it, with one warning naming why, so a server never crashes on it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from vllm_armor.kernels.base import ArmorKernel, LayerSpec
from vllm_armor.kernels.dense import DenseFoldKernel
from vllm_armor.kernels.factored import FactoredKernel, factored_forward
from vllm_armor.kernels.sparse24 import Sparse24Kernel
from vllm_armor.kernels.sparse24_cpu import Sparse24CpuKernel
from vllm_armor.kernels.triton24 import Triton24Kernel

KERNEL_ENV = "VLLM_ARMOR_KERNEL"
AUTO = "auto"
KERNELS: tuple[type[ArmorKernel], ...] = (
    Triton24Kernel, Sparse24Kernel, Sparse24CpuKernel, DenseFoldKernel, FactoredKernel)

# A child of "vllm" so that vLLM's logging configuration prints it next to its own lines.
logger = logging.getLogger("vllm.armor")
_WARNED: set[str] = set()

__all__ = ["AUTO", "KERNELS", "KERNEL_ENV", "ArmorKernel", "LayerSpec", "build_kernel", "choose_kernel", "compile_key",
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
            return kernel, "; ".join([f"{kernel.description} ({why})", *rejected])
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


def _next_kernel(spec: LayerSpec, after: type[ArmorKernel]) -> tuple[type[ArmorKernel], str] | None:
    for kernel in KERNELS[KERNELS.index(after) + 1:]:
        ok, why = kernel.can_implement(spec)
        if ok:
            return kernel, why
    return None


def build_kernel(layer: nn.Module, spec: LayerSpec, shards: Sequence[Mapping[str, torch.Tensor]], where: str,
                 requested: str | None = None) -> tuple[ArmorKernel, str]:
    """(kernel, reason): the chosen kernel with its parameters registered on ``layer``. A kernel that fails to
    build leaves the layer to the next kernel of `KERNELS` that can run it (its parameters removed again), with
    one warning per kernel naming why; the last candidate's failure is raised."""
    kernel_cls, reason = choose_kernel(spec, requested)
    while True:
        before = {name for name, _ in layer.named_parameters(recurse=False)}
        kernel = kernel_cls(spec)
        try:
            kernel.process_weights(layer, shards)
            return kernel, reason
        except Exception as err:  # any failure of a kernel's build is a reason to try the next
            fallback = _next_kernel(spec, kernel_cls)
            if fallback is None:
                raise
            for name in {name for name, _ in layer.named_parameters(recurse=False)} - before:
                delattr(layer, name)
            why = f"{type(err).__name__}: {err}".splitlines()[0]
            log = logger.debug if kernel_cls.name in _WARNED else logger.warning
            _WARNED.add(kernel_cls.name)
            log("ARMOR kernel %s failed on %s (%s); its layers use %s instead", kernel_cls.name, where, why,
                fallback[0].name)
            kernel_cls, reason = fallback[0], f"{kernel_cls.name} failed ({why}); {fallback[1]}"
