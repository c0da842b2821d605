"""ARMOR checkpoints in transformers: `AutoModelForCausalLM.from_pretrained(ARMOR_DIR)` builds every pruned linear
as an `ArmorLinear` (the kernels vLLM serves with), through transformers' public third-party quantizer registration
(`register_quantization_config` / `register_quantizer`). `import vllm_armor` registers it when transformers loads
its quantizers (`vllm_armor.__init__`); this module imports transformers and torch, never vLLM.

Before the weights load, every linear of ``quantization_config.pruned_modules`` becomes an `ArmorSlot` whose
parameters are named by the format suffixes with the shapes and dtypes of the safetensors headers (the checkpoint's
`CheckpointIndex`, the same the vLLM plugin reads), so transformers loads the format tensors as stored; afterwards
each slot's tensors are checked against their headers and validated (`CheckpointIndex.check_loaded` / `validate`) and
the slot is replaced by an `ArmorLinear` that computes in the model's dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from vllm_armor import checkpoint_format as fmt
from vllm_armor.torch_module import ArmorLinear, require_armor_layers

log = logging.getLogger(__name__)
BIAS = "bias"


class ArmorQuantizationConfig(QuantizationConfigMixin):
    """config.json's ``quantization_config`` (docs/FORMAT.md), checked by `checkpoint_format.validate_quant_config`;
    its keys are its attributes, so `to_dict` writes back exactly what was read."""

    def __init__(self, **kwargs) -> None:
        self.__dict__.update(fmt.validate_quant_config(kwargs))


class ArmorSlot(nn.Module):
    """A pruned linear while transformers loads it: one meta parameter per format tensor in the checkpoint."""

    def __init__(self, name: str, linear: nn.Module, index: fmt.CheckpointIndex) -> None:
        super().__init__()
        self.name, self.shape, self.index = name, (int(linear.out_features), int(linear.in_features)), index
        self.suffixes = [s for s in (*fmt.TENSOR_SUFFIXES, BIAS) if fmt.tensor_name(name, s) in index.tensors]
        for suffix in self.suffixes:
            info = index.header(name, suffix)
            empty = torch.empty(info.shape, dtype=info.dtype, device="meta")
            self.register_parameter(suffix, nn.Parameter(empty, requires_grad=False))

    def build(self, dtype: torch.dtype) -> ArmorLinear:
        """The validated `ArmorLinear` computing in ``dtype``. A tensor not loaded, or loaded in a dtype other than the
        stored one (types are checked, never cast on the way in), is an error; so is a layer that is not finite in the
        checkpoint's or in ``dtype``, or whose outputs overflow (`checkpoint_format.check_numerics`)."""
        tensors = {}
        for suffix in self.suffixes:
            tensors[suffix] = getattr(self, suffix).data
            self.index.check_loaded(self.name, suffix, tensors[suffix])
        bias = tensors.pop(BIAS, None)
        self.index.validate(self.name, tensors, self.shape, serving_dtype=dtype)
        return ArmorLinear(tensors, bias, dtype)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    model.get_submodule(parent).register_module(child, module)


def _index(model: nn.Module, checkpoint_files: Sequence[str] | None, pruned: list[str]) -> fmt.CheckpointIndex:
    """The index of the checkpoint being loaded: the headers of the files transformers passes, else of the model's
    folder (each file checked against its size), checked like the vLLM plugin's (`CheckpointIndex.read`)."""
    if not checkpoint_files:
        return fmt.CheckpointIndex.read(Path(model.config._name_or_path), pruned)
    files = [Path(f) for f in checkpoint_files]
    return fmt.CheckpointIndex.read(files[0].parent, pruned, files)


def _linear(model: nn.Module, name: str) -> nn.Linear | None:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Linear) else None


class ArmorHfQuantizer(HfQuantizer):
    """Loads pre-pruned ARMOR checkpoints (no on-the-fly pruning: that is `armor-prune`)."""

    requires_calibration = True  # transformers refuses pre_quantized=False
    quantization_config: ArmorQuantizationConfig

    def __init__(self, quantization_config: ArmorQuantizationConfig, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        self.dtype: torch.dtype | None = None

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        self.dtype = dtype  # the compute dtype of the ARMOR layers
        return dtype

    def _process_model_before_weight_loading(self, model, checkpoint_files: Sequence[str] | None = None, **kwargs):
        pruned = self.quantization_config.pruned_modules
        index = _index(model, checkpoint_files, pruned)
        linears = {name: _linear(model, name) for name in pruned}
        index.check_served(name for name, linear in linears.items() if linear is not None)
        for name, linear in linears.items():
            _set_submodule(model, name, ArmorSlot(name, linear, index))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        dtype = self.dtype or model.dtype
        pruned = self.quantization_config.pruned_modules
        for name in pruned:
            _set_submodule(model, name, model.get_submodule(name).build(dtype))
        require_armor_layers(model, pruned)
        log.info("built %d ARMOR layers (compute dtype %s)", len(pruned), dtype)
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return False  # ArmorLinear holds kernel tensors, not the format's: re-export with armor-prune instead

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the ``armor`` quantization method with transformers (idempotent)."""
    if fmt.QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return
    register_quantization_config(fmt.QUANT_METHOD)(ArmorQuantizationConfig)
    register_quantizer(fmt.QUANT_METHOD)(ArmorHfQuantizer)


register()  # importing this module registers it (`vllm_armor.register_transformers` imports it)
