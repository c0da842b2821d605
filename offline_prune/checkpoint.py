"""Write and read ARMOR checkpoints (format: vllm_armor.checkpoint_format, docs/FORMAT.md)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from offline_prune.armor_linear import ArmorLinear
from offline_prune.models import UserError
from vllm_armor import checkpoint_format as fmt

log = logging.getLogger(__name__)
MAX_SHARD_BYTES = 4 * 1024**3
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILES = ("generation_config.json",)


def dtype_of_config(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.bfloat16


def checkpoint_state(
    model: nn.Module, pruned: Mapping[str, Mapping[str, torch.Tensor]], out_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Tensors of the output checkpoint: dense ones in ``out_dtype``, pruned linears in ARMOR format."""
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
            dtype = out_dtype if suffix == fmt.CORE_VALUES else tensor.dtype
            state[fmt.tensor_name(module, suffix)] = tensor.to("cpu", dtype)
    return {k: v.contiguous() for k, v in sorted(state.items())}


def _shards(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def write_checkpoint(
    out: Path, source: str, config, tokenizer, state: dict[str, torch.Tensor], quant_config: dict,
    out_dtype: torch.dtype,
) -> None:
    """Write weights, config.json (with quantization_config), tokenizer and generation config to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    shards = _shards(state)
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
    config_dict = config.to_dict()
    config_dict["quantization_config"] = quant_config
    config_dict["dtype"] = str(out_dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out)
    src = Path(source)
    for name in CONFIG_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    for file in out.glob("*.safetensors"):
        file.chmod(0o644)  # readable by a non-root server process


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / INDEX_FILE
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"
    ]
    tensors = {}
    for file in files:
        path = folder / file
        if not path.is_file():
            raise UserError(f"checkpoint file {path} is missing")
        with safe_open(path, framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def is_armor_checkpoint(folder: Path) -> bool:
    cfg = json.loads((folder / "config.json").read_text())
    return (cfg.get("quantization_config") or {}).get("quant_method") == fmt.QUANT_METHOD


def load_model(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """A dense HF folder or an ARMOR checkpoint as a transformers model (ARMOR layers as `ArmorLinear`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a model folder (no config.json)")
    if not is_armor_checkpoint(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    config = AutoConfig.from_pretrained(path)
    qc = fmt.validate_quant_config(config.quantization_config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = read_safetensors(path)
    for module in qc["pruned_modules"]:
        _install_armor_linear(model, module, state, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    pruned = set(qc["pruned_modules"])
    missing = [k for k in missing if k not in tied and k.rpartition(".")[0] not in pruned]
    if missing or unexpected:
        raise fmt.ArmorFormatError(f"{path}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    model.tie_weights()
    return model.to(device).eval()


def _install_armor_linear(model: nn.Module, module: str, state: dict[str, torch.Tensor], dtype) -> None:
    try:
        linear = model.get_submodule(module)
    except AttributeError as err:
        raise fmt.ArmorFormatError(f"pruned module {module!r} does not exist in the model") from err
    names = {s: fmt.tensor_name(module, s) for s in fmt.TENSOR_SUFFIXES}
    tensors = {s: state.pop(name) for s, name in names.items() if name in state}
    fmt.validate_linear(module, tensors, expected_shape=(linear.out_features, linear.in_features))
    bias = state.pop(f"{module}.bias", None)
    parent_name, _, child = module.rpartition(".")
    model.get_submodule(parent_name).register_module(child, ArmorLinear.from_tensors(tensors, bias, dtype))
