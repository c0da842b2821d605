"""The kernel interface of the ARMOR linear layer (after vLLM's MPLinearKernel: can_implement / process
weights / apply).

A kernel turns the validated format tensors of one layer (one entry per shard of a fused layer: q/k/v,
gate/up) into parameters of its own on the layer, and computes y = concat_s A_s (core_s (B_s x)) + bias
from them. The same classes serve the vLLM plugin and the offline `ArmorLinear`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class LayerSpec:
    """What a kernel may look at to decide whether it can run a layer."""

    device: torch.device
    dtype: torch.dtype  # compute dtype of the layer
    out_sizes: tuple[int, ...]  # output rows of every shard
    d_in: int
    has_ab: bool


class ArmorKernel(ABC):
    """One way to compute an ARMOR layer. A subclass is one file plus one entry in `kernels.KERNELS`."""

    name: ClassVar[str]
    description: ClassVar[str]

    @classmethod
    def supports_device(cls, device: torch.device) -> tuple[bool, str]:
        """(ok, reason): whether this kernel can run on ``device`` at all."""
        return True, f"{cls.name} runs on every device"

    @classmethod
    def layer_refusal(cls, spec: LayerSpec) -> str | None:
        """Why this kernel cannot run the layer's shape or dtype (device aside), or None; by default every layer."""
        return None

    @classmethod
    def can_implement(cls, spec: LayerSpec) -> tuple[bool, str]:
        """(ok, reason) for one layer: its device (`supports_device`), then its shape and dtype (`layer_refusal`)."""
        ok, why = cls.supports_device(spec.device)
        refusal = cls.layer_refusal(spec) if ok else None
        return (False, refusal) if refusal else (ok, why)

    def __init__(self, spec: LayerSpec) -> None:
        self.spec = spec

    @abstractmethod
    def process_weights(self, layer: nn.Module, shards: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Register this kernel's parameters on ``layer`` from the format tensors of its shards."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """y = layer(x) + bias from the parameters registered by `process_weights`."""


def cuda_sm80(device: torch.device) -> tuple[bool, str]:
    """(ok, reason): ``device`` is a CUDA GPU of compute capability 8.0 or later (sparse tensor cores, bf16 dots)."""
    if device.type != "cuda":
        return False, f"device is {device.type}, not a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"GPU capability {major}.{minor} < 8.0"
    return True, f"CUDA capability {major}.{minor}"


def register_frozen(layer: nn.Module, name: str, tensor: torch.Tensor) -> None:
    layer.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
