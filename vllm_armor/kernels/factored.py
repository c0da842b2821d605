"""`factored`: keep B, the 2:4 core (expanded to a zero-filled dense matrix) and A, and compute
y = concat_s A_s (core_s (B_s x)) + bias per call with the custom op ``vllm_armor::factored_linear``.

Why a custom op: the graph depends on the checkpoint (A/B present or not, one shard or three), which vLLM's
compile cache key does not cover; as one opaque node with a fixed signature the traced graph is the same for
every checkpoint. `factored_forward` is the one forward implementation; other kernels pass their own core
matmul.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vllm_armor import checkpoint_format as fmt
from vllm_armor.blockdiag import blockdiag_apply
from vllm_armor.kernels.base import ArmorKernel, register_frozen

CoreMatmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def factored_forward(
    x: torch.Tensor,
    cores: Sequence[torch.Tensor],
    a_blocks: Sequence[torch.Tensor],
    b_blocks: Sequence[torch.Tensor],
    bias: torch.Tensor | None,
    core_matmul: CoreMatmul = F.linear,
) -> torch.Tensor:
    """y = concat_s A_s (core_s (B_s x)) + bias; ``a_blocks``/``b_blocks`` empty for plain 2:4 layers."""
    outs = []
    for i, core in enumerate(cores):
        xi = blockdiag_apply(x, b_blocks[i]) if b_blocks else x
        yi = core_matmul(xi, core)
        outs.append(blockdiag_apply(yi, a_blocks[i]) if a_blocks else yi)
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    return y + bias if bias is not None else y


@torch.library.custom_op("vllm_armor::factored_linear", mutates_args=())
def factored_linear(
    x: torch.Tensor,
    cores: list[torch.Tensor],
    a_blocks: list[torch.Tensor],
    b_blocks: list[torch.Tensor],
    bias: torch.Tensor | None,
) -> torch.Tensor:
    y = factored_forward(x, cores, a_blocks, b_blocks, bias)
    return y.clone() if y is x else y


@factored_linear.register_fake
def _factored_linear_fake(x, cores, a_blocks, b_blocks, bias):
    return x.new_empty((*x.shape[:-1], sum(int(c.shape[0]) for c in cores)))


class FactoredKernel(ArmorKernel):
    name = "factored"
    description = "A, 2:4 core (zero-filled dense) and B kept apart, y = A (core (B x)) per call"

    def process_weights(self, layer: nn.Module, shards: Sequence[Mapping[str, torch.Tensor]]) -> None:
        self.n_shards = len(shards)
        for i, tensors in enumerate(shards):
            decoded = fmt.decode_linear(tensors, self.spec.dtype)
            register_frozen(layer, f"armor_core_{i}", self.prepare_core(decoded.core))
            if decoded.a_blocks is not None:
                register_frozen(layer, f"armor_a_{i}", decoded.a_blocks.contiguous())
                register_frozen(layer, f"armor_b_{i}", decoded.b_blocks.contiguous())

    def prepare_core(self, core: torch.Tensor) -> torch.Tensor:
        """The stored form of a dense zero-filled core (a subclass may compress it)."""
        return core

    def factors(self, layer: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        shards = range(self.n_shards)
        cores = [getattr(layer, f"armor_core_{i}") for i in shards]
        if not self.spec.has_ab:
            return cores, [], []
        return cores, [getattr(layer, f"armor_a_{i}") for i in shards], [getattr(layer, f"armor_b_{i}") for i in shards]

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        cores, a, b = self.factors(layer)
        return torch.ops.vllm_armor.factored_linear(x, cores, a, b, bias)
