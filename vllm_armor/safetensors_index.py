"""Names, shapes and dtypes of a checkpoint's tensors, read from the safetensors headers (no tensor data).

Importable without vLLM. Used by the plugin to size ARMOR parameters before loading and to report a
missing tensor by name at start-up.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("vllm_armor.safetensors_index")

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


def read_header(path: Path) -> dict[str, TensorInfo]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(meta["dtype"])
        if dtype is None:
            continue  # a dtype ARMOR never uses (e.g. FP8): not an ARMOR tensor
        out[name] = TensorInfo(tuple(int(d) for d in meta["shape"]), dtype)
    return out


def _resolve_dir(model: str, revision: str | None) -> Path | None:
    path = Path(model)
    if path.is_dir():
        return path
    try:  # a hub id: vLLM has downloaded it already; look in the local cache only
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - any failure means "not available locally"
        log.warning("cannot locate the files of %s locally: %s", model, exc)
        return None


def read_tensor_index(model: str, revision: str | None = None) -> dict[str, TensorInfo]:
    """All tensors of the checkpoint's *.safetensors files (empty when none can be found)."""
    folder = _resolve_dir(model, revision)
    if folder is None:
        return {}
    index: dict[str, TensorInfo] = {}
    for file in sorted(folder.glob("*.safetensors")):
        index.update(read_header(file))
    return index
