"""Write and read ARMOR checkpoints with transformers around the format module's folder writer/reader
(vllm_armor.checkpoint_format, docs/FORMAT.md): the pruner's output, and models for `armor-eval`."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from vllm_armor import checkpoint_format as fmt
from vllm_armor.torch_module import require_armor_layers

log = logging.getLogger(__name__)
CONFIG_FILES = ("generation_config.json",)


def dtype_of_config(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.bfloat16


def checkpoint_state(
    model: nn.Module, pruned: Mapping[str, Mapping[str, torch.Tensor]], out_dtype: torch.dtype,
    ab_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors of the output checkpoint: dense ones in ``out_dtype``, pruned linears in ARMOR format (core
    values in ``out_dtype``, A and B in ``ab_dtype``, default ``out_dtype``)."""
    ab_dtype = ab_dtype or out_dtype
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module in pruned and leaf == "weight":
            continue
        if tensor.data_ptr() in seen:  # tied weights (lm_head = embed_tokens) are stored once
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().to("cpu", out_dtype if tensor.is_floating_point() else tensor.dtype)
    for module, tensors in pruned.items():
        for suffix, tensor in tensors.items():
            dtype = {fmt.CORE_VALUES: out_dtype, fmt.ARMOR_A: ab_dtype, fmt.ARMOR_B: ab_dtype}.get(suffix, tensor.dtype)
            state[fmt.tensor_name(module, suffix)] = tensor.to("cpu", dtype)
    return {k: v.contiguous() for k, v in sorted(state.items())}


def write_checkpoint(
    out: Path, source: str, config, tokenizer, state: dict[str, torch.Tensor], quant_config: dict,
    out_dtype: torch.dtype,
) -> None:
    """Weights and config.json (with quantization_config) by the format's writer, plus the tokenizer and
    generation config of the source model."""
    config_dict = config.to_dict()
    config_dict["quantization_config"] = quant_config
    config_dict["dtype"] = str(out_dtype).removeprefix("torch.")
    fmt.write_folder(out, state, config_dict)
    tokenizer.save_pretrained(out)
    src = Path(source)
    for name in CONFIG_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)


def load_model(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """A dense HF folder or an ARMOR checkpoint as a transformers model, by `from_pretrained`: the ARMOR layers are
    `ArmorLinear`s built by the quantizer `vllm_armor.hf_quantizer` (computing in ``dtype``). A damaged weight file,
    a checkpoint whose ARMOR layers were not built, or with missing or unexpected tensors, is refused
    (ArmorFormatError, one line)."""
    from transformers import AutoModelForCausalLM

    path = Path(folder)
    config = fmt.read_config(path)
    if fmt.is_armor_config(config) or any(path.glob("*.safetensors")):
        fmt.read_headers(path)  # a damaged weight file names itself here, before transformers opens it
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    if fmt.is_armor_config(config):
        require_armor_layers(model, fmt.validate_quant_config(config["quantization_config"])["pruned_modules"], path)
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    if missing or unexpected or info["mismatched_keys"]:
        raise fmt.ArmorFormatError(f"{path}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}, "
                                   f"mismatched {sorted(info['mismatched_keys'])[:5]}")
    return model.to(device).eval()
