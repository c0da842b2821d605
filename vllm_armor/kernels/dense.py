"""`dense`: fold A, core and B into one dense weight at load (W = A core B, computed in float32) and run a
plain GEMM: vLLM's own unquantized method when the layer is a vLLM linear (oneDNN on CPU), else F.linear.
Fastest where no 2:4 kernel exists; memory as the dense model.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vllm_armor import checkpoint_format as fmt
from vllm_armor.kernels.base import ArmorKernel, register_frozen


def _vllm_dense_method(layer: nn.Module):
    """vLLM's UnquantizedLinearMethod for a vLLM linear layer, None elsewhere (vLLM is never imported here)."""
    if "vllm" not in sys.modules:
        return None
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

    return UnquantizedLinearMethod() if isinstance(layer, LinearBase) else None


class DenseFoldKernel(ArmorKernel):
    name = "dense"
    description = "A·core·B folded to one dense weight"

    def process_weights(self, layer: nn.Module, shards: Sequence[Mapping[str, torch.Tensor]]) -> None:
        weight = torch.cat([fmt.reconstruct_weight(t, torch.float32) for t in shards], dim=0)
        register_frozen(layer, "weight", weight.to(self.spec.dtype))
        self.gemm = _vllm_dense_method(layer)
        if self.gemm is not None:
            self.gemm.process_weights_after_loading(layer)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.gemm is not None:
            return self.gemm.apply(layer, x, bias)
        return F.linear(x, layer.weight, bias)
