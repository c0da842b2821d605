"""ARMOR checkpoints in transformers: `AutoModelForCausalLM.from_pretrained(ARMOR_DIR)` builds every pruned linear
as an `ArmorLinear` (the kernels vLLM serves with), through transformers' public third-party quantizer registration
(`register_quantization_config` / `register_quantizer`). `import vllm_armor` registers it when transformers loads
its quantizers (`vllm_armor.__init__`); this module imports transformers and torch, never vLLM.

Before the weights load, every linear of ``quantization_config.pruned_modules`` becomes an `ArmorSlot` whose
parameters are named by the format suffixes with the shapes and dtypes of the safetensors headers, so transformers
loads the format tensors as stored; afterwards each slot is validated (`checkpoint_format.validate_linear`) and
replaced by an `ArmorLinear` that computes in the model's dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
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

    def __init__(self, name: str, linear: nn.Module, headers: Mapping[str, fmt.TensorInfo]) -> None:
        super().__init__()
        self.name, self.shape = name, (int(linear.out_features), int(linear.in_features))
        self.stored: dict[str, torch.dtype] = {}
        for suffix in (*fmt.TENSOR_SUFFIXES, BIAS):
            info = headers.get(fmt.tensor_name(name, suffix))
            if info is not None:
                self.stored[suffix] = info.dtype
                empty = torch.empty(info.shape, dtype=info.dtype, device="meta")
                self.register_parameter(suffix, nn.Parameter(empty, requires_grad=False))

    def build(self, dtype: torch.dtype, model_dtype: torch.dtype | None) -> ArmorLinear:
        """The validated `ArmorLinear` computing in ``dtype`` (the checkpoint's dtype is ``model_dtype``). A tensor
        not loaded, or loaded in a dtype other than the stored one (types are checked, never cast on the way in), is
        an error; so is a layer that is not finite in either dtype."""
        tensors = {}
        for suffix, stored in self.stored.items():
            tensor = getattr(self, suffix).data
            if tensor.is_meta or tensor.dtype != stored:
                what = "was not loaded" if tensor.is_meta else f"was loaded as {tensor.dtype}, stored as {stored}"
                raise fmt.ArmorFormatError(f"ARMOR tensor '{fmt.tensor_name(self.name, suffix)}' {what}")
            tensors[suffix] = tensor
        bias = tensors.pop(BIAS, None)
        fmt.validate_linear(self.name, tensors, expected_shape=self.shape, model_dtype=model_dtype, serving_dtype=dtype)
        return ArmorLinear(tensors, bias, dtype)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    model.get_submodule(parent).register_module(child, module)


def _headers(model: nn.Module, checkpoint_files: Sequence[str] | None) -> tuple[dict[str, fmt.TensorInfo], Path]:
    """Tensor headers of the checkpoint being loaded (the files transformers passes, else the model's folder; each
    file checked against its size) and its folder."""
    if not checkpoint_files:
        folder = Path(model.config._name_or_path)
        return fmt.read_headers(folder), folder
    headers: dict[str, fmt.TensorInfo] = {}
    for file in checkpoint_files:
        headers.update(fmt.read_header(Path(file)))
    return headers, Path(checkpoint_files[0]).parent


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
        self.model_dtype: torch.dtype | None = None  # the checkpoint's (config.json), core_values are stored in it

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        self.dtype = dtype  # the compute dtype of the ARMOR layers
        return dtype

    def _process_model_before_weight_loading(self, model, checkpoint_files: Sequence[str] | None = None, **kwargs):
        headers, folder = _headers(model, checkpoint_files)
        pruned = self.quantization_config.pruned_modules
        self.model_dtype = fmt.config_dtype(fmt.read_config(folder))
        fmt.check_checkpoint(headers, pruned, self.model_dtype)  # the same checks as the vLLM plugin's
        linears = {name: _linear(model, name) for name in pruned}
        missing = [name for name, linear in linears.items() if linear is None]
        if missing:
            raise fmt.not_in_model(missing)
        for name, linear in linears.items():
            _set_submodule(model, name, ArmorSlot(name, linear, headers))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        dtype = self.dtype or model.dtype
        pruned = self.quantization_config.pruned_modules
        for name in pruned:
            _set_submodule(model, name, model.get_submodule(name).build(dtype, self.model_dtype))
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
