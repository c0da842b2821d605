"""Supported architectures as data, and the walk that finds a model's decoder layers and linears to prune.

One entry per Hugging Face ``config.model_type``: where the decoder layers are, which linears of a layer are
pruned (in the order they are visited and written) and which of them share an input tensor (one statistic).
Module names always come from ``model.named_modules()``. An unknown model_type is treated as Llama-style (with
a warning): any model with the same layout works.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from torch import nn

from offline_prune.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Architecture:
    layers: str  # dotted path of the decoder layers' ModuleList inside the CausalLM model
    linears: tuple[str, ...]  # pruned linears of a decoder layer, relative to the layer, in visiting order
    shared_inputs: tuple[tuple[str, ...], ...]  # linears fed the same tensor: the first one present owns the statistic


LLAMA_STYLE = Architecture(
    layers="model.layers",
    linears=(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ),
    shared_inputs=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("mlp.gate_proj", "mlp.up_proj"),
    ),
)
# Qwen2/2.5 add a q/k/v bias and Qwen3 a q/k norm; neither changes the pruned linears or their inputs.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": LLAMA_STYLE,
    "mistral": LLAMA_STYLE,
    "qwen2": LLAMA_STYLE,
    "qwen3": LLAMA_STYLE,
}


def architecture_of(model: nn.Module) -> Architecture:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        log.warning("model_type %r is not one of %s: assuming the Llama-style layout", model_type,
                    ", ".join(ARCHITECTURES))
        arch = LLAMA_STYLE
    return arch


@dataclass
class DecoderLayer:
    name: str  # full module name, from named_modules()
    module: nn.Module
    linears: dict[str, nn.Linear]  # full module name -> linear to prune, in the architecture's order
    local_names: dict[str, str]  # full module name -> name inside the layer (as in Architecture.linears)


def layer_list(model: nn.Module, arch: Architecture) -> tuple[str, nn.ModuleList]:
    """(name, ModuleList) of the decoder layers."""
    for name, module in model.named_modules():
        if name == arch.layers and isinstance(module, nn.ModuleList) and len(module) > 0:
            return name, module
    raise UserError(f"{type(model).__name__} has no decoder layers at {arch.layers} (Llama/Qwen/Mistral style)")


def decoder_layers(model: nn.Module, arch: Architecture, skip: re.Pattern | None = None) -> list[DecoderLayer]:
    """Every decoder layer with its linears to prune (those matching ``skip`` left out), in model order."""
    _, layers = layer_list(model, arch)
    names = {module: name for name, module in model.named_modules()}
    found = []
    for layer in layers:
        linears, local_names = {}, {}
        for local in arch.linears:
            module = _submodule(layer, local)
            if isinstance(module, nn.Linear) and not (skip and skip.search(names[module])):
                linears[names[module]] = module
                local_names[names[module]] = local
        found.append(DecoderLayer(names[layer], layer, linears, local_names))
    return found


def _submodule(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None
