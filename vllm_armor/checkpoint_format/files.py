"""The checkpoint folder: the one writer (`write_folder`) and reader (`read_folder`, `read_headers`) of its weight
files, shards and index, and config.json."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from vllm_armor.checkpoint_format.atomic import atomic_save_file, atomic_write_text
from vllm_armor.checkpoint_format.headers import TensorInfo, read_header
from vllm_armor.checkpoint_format.names import (
    CONFIG_FILE,
    INDEX_FILE,
    MAX_SHARD_BYTES,
    WEIGHTS_FILE,
    ArmorFormatError,
)


def _shards(state: Mapping[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def write_folder(out: Path, state: Mapping[str, torch.Tensor], config: Mapping,
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write ``state`` (in its order) as model.safetensors, or shards plus an index, and ``config`` as
    config.json, each file atomically. Tensors are written as given: cast them to their checkpoint dtypes first."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items()}
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        atomic_save_file(shards[0], out / WEIGHTS_FILE, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            atomic_save_file(shard, out / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True))
    atomic_write_text(out / CONFIG_FILE, json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    for file in out.glob("*.safetensors"):
        file.chmod(0o644)  # readable by a non-root server process


def read_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ArmorFormatError(f"{folder} is not a model folder (no {CONFIG_FILE})")
    return json.loads(path.read_text())


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those its index names, else every *.safetensors file."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            files = [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ArmorFormatError(f"{index} is not a readable safetensors index ({err})") from None
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ArmorFormatError(f"{folder} has no *.safetensors weight files")
    for path in files:
        if not path.is_file():
            raise ArmorFormatError(f"checkpoint file {path} is missing")
    return files


def read_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, every tensor of the checkpoint by name)."""
    config = read_config(folder)
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        read_header(path)  # a damaged file names itself before safetensors reads it
        with safe_open(path, framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return config, tensors


def read_headers(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint's weight files, from the headers alone (each file checked by `read_header`)."""
    index: dict[str, TensorInfo] = {}
    for path in weight_files(folder):
        index.update(read_header(path))
    return index


def config_dtype(config: Mapping) -> torch.dtype | None:
    """The model dtype config.json declares ('dtype', formerly 'torch_dtype'), or None."""
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
