"""One safetensors file's header: names, shapes and dtypes of its tensors, checked against the file's size before any
reader opens it (docs/FORMAT.md, Validation step 1)."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vllm_armor.checkpoint_format.names import ArmorFormatError

# Safetensors header dtypes as torch dtypes; tensors of others (e.g. F4) are not listed by `read_header`.
_HEADER_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8,
    "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
# Bytes per element of every safetensors dtype, to check each tensor's byte range against its shape.
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1,
                "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
HEADER_LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100 * 1024**2  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str = field(default="", compare=False)  # the safetensors file holding it

    @property
    def where(self) -> str:
        return Path(self.file).name


def info_of(tensor: torch.Tensor) -> TensorInfo:
    return TensorInfo(tuple(tensor.shape), tensor.dtype)


def _damaged(path: Path, what: str) -> ArmorFormatError:
    return ArmorFormatError(f"safetensors file {path}: {what}")


def _raw_header(path: Path) -> tuple[dict, int]:
    """(the JSON header, bytes of tensor data the file holds) of one safetensors file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < HEADER_LENGTH_BYTES:
                raise _damaged(path, "is empty" if size == 0 else f"is {size} bytes, too short for a header")
            (n,) = struct.unpack("<Q", f.read(HEADER_LENGTH_BYTES))
            if n > size - HEADER_LENGTH_BYTES or n > MAX_HEADER_BYTES:
                raise _damaged(path, f"header length {n} exceeds the {size - HEADER_LENGTH_BYTES} bytes that follow "
                                     "(truncated, or not a safetensors file)")
            raw = f.read(n)
    except OSError as err:
        raise _damaged(path, f"cannot be read ({err.strerror or err})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(path, f"unreadable header ({err})") from None
    if not isinstance(header, dict):
        raise _damaged(path, "unreadable header (not a JSON object)")
    return header, size - HEADER_LENGTH_BYTES - n


def _entry(path: Path, name: str, meta: object, data_bytes: int) -> tuple[str, tuple[int, ...], int]:
    """(dtype, shape, end offset) of one header entry, checked against the data the file holds."""
    try:
        dtype, shape, (start, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        if not all(isinstance(v, int) and v >= 0 for v in (*shape, start, end)) or not isinstance(dtype, str):
            raise TypeError
    except (TypeError, KeyError, ValueError):
        raise _damaged(path, f"unreadable header entry for tensor '{name}': {meta!r}"[:300]) from None
    if end > data_bytes:
        raise _damaged(path, f"truncated: tensor '{name}' needs bytes {start}..{end} of the data, the file holds "
                             f"{data_bytes}")
    itemsize = _DTYPE_BYTES.get(dtype)
    if end < start or (itemsize is not None and end - start != math.prod(shape) * itemsize):
        raise _damaged(path, f"tensor '{name}' ({dtype} {list(shape)}) has {end - start} bytes of data in its header")
    return dtype, shape, end


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of one safetensors file, from its header (no tensor data). The header is checked
    against the file: an empty, truncated or unreadable file raises ArmorFormatError naming the file."""
    path = Path(path)
    header, data_bytes = _raw_header(path)
    out, covered = {}, 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, end = _entry(path, name, meta, data_bytes)
        covered = max(covered, end)
        if dtype in _HEADER_DTYPES:
            out[name] = TensorInfo(shape, _HEADER_DTYPES[dtype], str(path))
    if covered != data_bytes:
        raise _damaged(path, f"holds {data_bytes} bytes of tensor data, its header describes {covered}")
    return out
