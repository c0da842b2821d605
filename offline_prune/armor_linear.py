"""`ArmorLinear`: the offline (no vLLM) torch module of a pruned linear, y = A (core (B x)) + bias.

It computes with the same kernels module as the vLLM plugin (vllm_armor.kernels), so the offline and the
served model compute the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from vllm_armor import checkpoint_format as fmt
from vllm_armor.kernels import armor_linear_dense_core


class ArmorLinear(nn.Module):
    def __init__(
        self,
        core: torch.Tensor,
        a_blocks: torch.Tensor | None,
        b_blocks: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = core.shape
        self.register_buffer("core", core)
        self.register_buffer("a_blocks", a_blocks)
        self.register_buffer("b_blocks", b_blocks)
        self.register_buffer("bias", bias)

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], bias: torch.Tensor | None, dtype: torch.dtype
    ) -> ArmorLinear:
        """Build from validated format tensors (suffix -> tensor); compute in ``dtype``."""
        core = fmt.unpack_2to4(tensors[fmt.CORE_VALUES], tensors[fmt.CORE_META]).to(dtype)
        a = tensors[fmt.ARMOR_A].to(dtype) if fmt.ARMOR_A in tensors else None
        b = tensors[fmt.ARMOR_B].to(dtype) if fmt.ARMOR_B in tensors else None
        return cls(core, a, b, bias.to(dtype) if bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return armor_linear_dense_core(x, self.a_blocks, self.core, self.b_blocks, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """W_hat = A @ core @ B, in float32."""
        w = self.core.float()
        if self.a_blocks is None:
            return w
        return fmt.block_diag_dense(self.a_blocks.float()) @ w @ fmt.block_diag_dense(self.b_blocks.float())

    def extra_repr(self) -> str:
        blocks = "" if self.a_blocks is None else f", blocks=({self.a_blocks.shape[1]}, {self.b_blocks.shape[1]})"
        return f"in_features={self.in_features}, out_features={self.out_features}{blocks}"
