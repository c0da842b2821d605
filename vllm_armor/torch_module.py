"""`ArmorLinear`: the torch module (no vLLM) of a pruned linear, y = A (core (B x)) + bias, used by
`armor-eval` and by transformers' `from_pretrained` (`vllm_armor.hf_quantizer`).

It holds a kernel from `vllm_armor.kernels` (the same classes the vLLM plugin serves with; `factored` by
default), so the offline and the served model compute the same thing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from vllm_armor import checkpoint_format as fmt
from vllm_armor.kernels import ArmorKernel, LayerSpec
from vllm_armor.kernels.factored import FactoredKernel


class ArmorLinear(nn.Module):
    def __init__(self, tensors: Mapping[str, torch.Tensor], bias: torch.Tensor | None, dtype: torch.dtype,
                 kernel: type[ArmorKernel] = FactoredKernel) -> None:
        """From validated format tensors (suffix -> tensor) of one linear; compute in ``dtype``."""
        super().__init__()
        shapes = fmt.check_shapes("", {s: tuple(t.shape) for s, t in tensors.items()})
        self.out_features, self.in_features = shapes.d_out, shapes.d_in
        self.blocks = (shapes.block_out, shapes.block_in) if shapes.has_ab else None
        device = tensors[fmt.CORE_VALUES].device
        self.kernel = kernel(LayerSpec(device, dtype, (shapes.d_out,), shapes.d_in, shapes.has_ab))
        self.kernel.process_weights(self, [tensors])
        self.register_buffer("bias", bias.to(dtype) if bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.apply(self, x, self.bias)

    def extra_repr(self) -> str:
        blocks = "" if self.blocks is None else f", blocks={self.blocks}"
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel.name}{blocks}"


def require_armor_layers(model: nn.Module, pruned_modules: Iterable[str], where: object = "model") -> None:
    """Refuse a model in which a pruned module of the checkpoint is not an `ArmorLinear` (e.g. transformers
    skipped the unregistered `armor` quantization method and built a plain, randomly initialised linear)."""
    for name in pruned_modules:
        module = model.get_submodule(name)
        if not isinstance(module, ArmorLinear):
            raise fmt.ArmorFormatError(
                f"{where}: pruned module {name!r} was loaded as {type(module).__name__}, not as an ARMOR layer: "
                "the transformers quantizer 'armor' was not registered (`import vllm_armor` before from_pretrained)")
