"""ARMOR checkpoint format, version 1: the one definition of names, packing, shapes, validation and the
checkpoint folder (docs/FORMAT.md). The pruner (`offline_prune`), the offline reader and the vLLM plugin all
go through this module; it imports torch and safetensors only.

A pruned linear ``P`` (weight W of shape d_out x d_in) is stored as

    P.core_values  (d_out, d_in // 2)              model dtype   the 2 kept values of each group of 4
    P.core_meta    (d_out, d_in // 8)              uint8         4-bit keep-mask per group, 2 groups a byte
    P.armor_a      (d_out // bs_out, bs_out, bs_out) float       block-diagonal A (optional; model dtype or float32)
    P.armor_b      (d_in // bs_in, bs_in, bs_in)   float       block-diagonal B (optional; as A)
    P.bias         (d_out,)                        model dtype   unchanged (optional)

and computes y = A (core (B x)) + bias. Group g of a row covers inputs 4g..4g+3; its nibble has bit k
set when input 4g+k is kept (exactly two bits set); group 2m is the low nibble of byte m, group 2m+1 the
high nibble. The two kept values are stored in increasing input order. A and B are either both present
or both absent (plain 2:4 checkpoints from the baselines carry neither). Block-diagonal matrices follow
the convention of `vllm_armor.kernels.blockdiag`: blocks[J] is the J-th diagonal block.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_armor.blockdiag import blockdiag_left, blockdiag_right

FORMAT_VERSION = 1
QUANT_METHOD = "armor"
SPARSITY = "2:4"

CORE_VALUES = "core_values"
CORE_META = "core_meta"
ARMOR_A = "armor_a"
ARMOR_B = "armor_b"
TENSOR_SUFFIXES = (CORE_VALUES, CORE_META, ARMOR_A, ARMOR_B)

# Keys of config.json's quantization_config and whether they are required.
QUANT_CONFIG_KEYS = {
    "quant_method": True,
    "format_version": True,
    "sparsity": True,
    "method": False,  # which pruning method produced the checkpoint (informational)
    "block_size": False,  # the requested block size, or "auto" (actual sizes come from tensor shapes)
    "max_overhead": False,  # with block_size "auto": the A+B budget per kept core value (informational)
    "cost": False,  # ab_overhead, weight_bytes, dense_bytes, bytes_ratio of the checkpoint (informational)
    "pruned_modules": True,  # full names of the pruned linear layers
}

GROUP = 4  # consecutive inputs of a 2:4 group
KEEP = 2  # kept inputs per group
META_INPUTS = 2 * GROUP  # inputs described by one metadata byte

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 4 * 1024**3


class ArmorFormatError(ValueError):
    """A checkpoint or tensor does not follow the ARMOR format; the message names what is wrong."""


def tensor_name(module: str, suffix: str) -> str:
    return f"{module}.{suffix}"


# ---------------------------------------------------------------------------------------------------
# 2:4 packing
# ---------------------------------------------------------------------------------------------------


def check_packable(d_in: int, where: str = "") -> None:
    if d_in % META_INPUTS != 0:
        raise ArmorFormatError(f"{where}input dimension {d_in} is not a multiple of 8 (two groups of 4 a byte)")


def mask_is_2of4(mask: torch.Tensor) -> bool:
    """True when every group of 4 consecutive inputs of every row keeps exactly 2."""
    d_out, d_in = mask.shape
    if d_in % GROUP:
        return False
    return bool((mask.reshape(d_out, d_in // GROUP, GROUP).sum(-1) == KEEP).all())


def pack_2to4(dense_core: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a 2:4 matrix: returns (values (d_out, d_in/2), meta uint8 (d_out, d_in/8)).

    ``mask`` is the boolean keep-mask (exactly 2 True in every group of 4); values outside it are ignored.
    A kept value that happens to be 0 stays kept (the mask, not the value, defines the pattern).
    """
    d_out, d_in = dense_core.shape
    check_packable(d_in)
    if mask.shape != dense_core.shape or not mask_is_2of4(mask):
        raise ArmorFormatError("mask is not a valid 2:4 mask of the core's shape")
    groups = mask.reshape(d_out, d_in // GROUP, GROUP)
    bits = torch.tensor([1, 2, 4, 8], dtype=torch.uint8, device=mask.device)
    nibbles = (groups.to(torch.uint8) * bits).sum(-1, dtype=torch.uint8)  # (d_out, d_in/4)
    meta = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    values = dense_core[mask].reshape(d_out, d_in // 2)  # row-major: increasing input order per group
    return values, meta.to(torch.uint8)


def unpack_mask(meta: torch.Tensor) -> torch.Tensor:
    """Boolean keep-mask (d_out, 8 * meta.shape[1]) from packed metadata."""
    d_out, n_bytes = meta.shape
    nibbles = torch.stack((meta & 0x0F, meta >> 4), dim=-1).reshape(d_out, 2 * n_bytes)
    shifts = torch.arange(GROUP, device=meta.device, dtype=torch.uint8)
    bits = (nibbles.unsqueeze(-1) >> shifts) & 1
    return bits.bool().reshape(d_out, n_bytes * META_INPUTS)


def unpack_2to4(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Dense (d_out, d_in) core from compressed values and metadata (inverse of `pack_2to4`)."""
    mask = unpack_mask(meta)
    dense = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    dense[mask] = values.reshape(-1)
    return dense


# ---------------------------------------------------------------------------------------------------
# One linear: encode and decode
# ---------------------------------------------------------------------------------------------------


def encode_linear(
    core: torch.Tensor, mask: torch.Tensor, a_blocks: torch.Tensor | None = None, b_blocks: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Format tensors (suffix -> CPU tensor) of one pruned linear: packed core, and A/B in float32 if given.

    The values keep the core's dtype; the checkpoint writer casts them to the model dtype.
    """
    if (a_blocks is None) != (b_blocks is None):
        raise ArmorFormatError("A and B come together: got only one of them")
    values, meta = pack_2to4(core.cpu(), mask.cpu())
    tensors = {CORE_VALUES: values, CORE_META: meta}
    if a_blocks is not None:
        tensors[ARMOR_A] = a_blocks.float().cpu().contiguous()
        tensors[ARMOR_B] = b_blocks.float().cpu().contiguous()
    return tensors


@dataclass
class DecodedLinear:
    """A pruned linear with its core expanded to a dense zero-filled matrix (all in one dtype)."""

    core: torch.Tensor  # (d_out, d_in)
    a_blocks: torch.Tensor | None  # (n_out, bs_out, bs_out)
    b_blocks: torch.Tensor | None  # (n_in, bs_in, bs_in)


def decode_linear(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> DecodedLinear:
    """Inverse of `encode_linear`, every tensor in ``dtype`` (values cast before the scatter)."""
    core = unpack_2to4(tensors[CORE_VALUES].to(dtype), tensors[CORE_META])
    a, b = tensors.get(ARMOR_A), tensors.get(ARMOR_B)
    return DecodedLinear(core, a.to(dtype) if a is not None else None, b.to(dtype) if b is not None else None)


def reconstruct_weight(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_hat = A @ core @ B as a dense matrix in ``dtype`` (float32 by default): the format's semantics."""
    lin = decode_linear(tensors, dtype)
    if lin.a_blocks is None:
        return lin.core
    return blockdiag_left(lin.a_blocks, blockdiag_right(lin.core, lin.b_blocks))


def linear_tensors(state: Mapping[str, torch.Tensor], module: str) -> dict[str, torch.Tensor]:
    """The format tensors of ``module`` found in ``state`` (suffix -> tensor)."""
    return {s: state[tensor_name(module, s)] for s in TENSOR_SUFFIXES if tensor_name(module, s) in state}


# ---------------------------------------------------------------------------------------------------
# Shapes and validation
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearShapes:
    """Shapes of one pruned linear as read from its tensors."""

    d_out: int
    d_in: int
    block_out: int | None  # None when the linear carries no A/B
    block_in: int | None

    @property
    def has_ab(self) -> bool:
        return self.block_out is not None


def expected_shapes(d_out: int, d_in: int, block_out: int | None = None,
                    block_in: int | None = None) -> dict[str, tuple[int, ...]]:
    """Shape of every format tensor of a d_out x d_in linear (A/B only when block sizes are given)."""
    shapes: dict[str, tuple[int, ...]] = {CORE_VALUES: (d_out, d_in // 2), CORE_META: (d_out, d_in // META_INPUTS)}
    if block_out is not None and block_in is not None:
        shapes[ARMOR_A] = (d_out // block_out, block_out, block_out)
        shapes[ARMOR_B] = (d_in // block_in, block_in, block_in)
    return shapes


def _error(module: str, suffix: str, msg: str) -> ArmorFormatError:
    return ArmorFormatError(f"ARMOR tensor '{tensor_name(module, suffix)}': {msg}")


def _block_size(module: str, suffix: str, shape: tuple[int, ...], dim: int, side: str) -> int:
    if len(shape) != 3 or shape[1] != shape[2]:
        raise _error(module, suffix, f"expected (n_blocks, bs, bs) square blocks, got shape {tuple(shape)}")
    n_blocks, bs = int(shape[0]), int(shape[1])
    if n_blocks * bs != dim:
        raise _error(module, suffix,
                     f"{n_blocks} blocks of {bs} do not cover the {side} dimension {dim} (block size must divide it)")
    return bs


def check_shapes(module: str, shapes: Mapping[str, tuple[int, ...]], d_out: int | None = None,
                 d_in: int | None = None) -> LinearShapes:
    """Check the shapes of one linear's tensors (suffix -> shape, from tensors or safetensors headers).

    Presence and ranks come first, then the metadata, so that a derived check never blames the wrong tensor;
    ``d_out``/``d_in`` are the layer's dimensions where known. Returns the dimensions and block sizes.
    """
    for suffix in (CORE_VALUES, CORE_META):
        if suffix not in shapes:
            raise ArmorFormatError(f"ARMOR tensor '{tensor_name(module, suffix)}' is missing")
    meta = tuple(shapes[CORE_META])
    if len(meta) != 2:
        raise _error(module, CORE_META, f"expected a 2-D tensor, got shape {meta}")
    rows, cols = int(meta[0]), int(meta[1]) * META_INPUTS
    values = tuple(shapes[CORE_VALUES])
    if values != expected_shapes(rows, cols)[CORE_VALUES]:
        want = expected_shapes(rows, cols)[CORE_VALUES]
        raise _error(module, CORE_VALUES, f"expected shape {want} to match {tensor_name(module, CORE_META)}, "
                                          f"got {values}")
    layer = (d_out if d_out is not None else rows, d_in if d_in is not None else cols)
    if (rows, cols) != layer:
        want = expected_shapes(*layer)[CORE_VALUES]
        raise _error(module, CORE_VALUES, f"expected shape {want} for a {layer[0]}x{layer[1]} layer, got {values} "
                                          f"(a {rows}x{cols} weight)")
    has_a, has_b = ARMOR_A in shapes, ARMOR_B in shapes
    if has_a != has_b:
        missing = ARMOR_B if has_a else ARMOR_A
        raise ArmorFormatError(f"ARMOR tensor '{tensor_name(module, missing)}' is missing (A and B come together)")
    if not has_a:
        return LinearShapes(rows, cols, None, None)
    bs_out = _block_size(module, ARMOR_A, tuple(shapes[ARMOR_A]), rows, "output")
    bs_in = _block_size(module, ARMOR_B, tuple(shapes[ARMOR_B]), cols, "input")
    return LinearShapes(rows, cols, bs_out, bs_in)


def validate_linear(
    module: str,
    tensors: Mapping[str, torch.Tensor],
    expected_shape: tuple[int, int] | None = None,
) -> LinearShapes:
    """Validate the ARMOR tensors of one pruned linear; return its shapes.

    ``tensors`` maps suffixes (``core_values``, ``core_meta``, ``armor_a``, ``armor_b``) to tensors.
    ``expected_shape`` is (d_out, d_in) of the dense layer when known. Raises ArmorFormatError naming
    the offending tensor.
    """
    if CORE_META in tensors and tensors[CORE_META].dtype != torch.uint8:
        meta = tensors[CORE_META]
        raise _error(module, CORE_META, f"expected a 2-D uint8 tensor, got {meta.dtype} {tuple(meta.shape)}")
    layer = expected_shape or (None, None)
    shapes = check_shapes(module, {s: tuple(t.shape) for s, t in tensors.items()}, *layer)
    for suffix, t in tensors.items():
        if suffix != CORE_META and not t.is_floating_point():
            raise _error(module, suffix, f"expected a floating dtype, got {t.dtype}")
    kept = unpack_mask(tensors[CORE_META]).reshape(shapes.d_out, shapes.d_in // GROUP, GROUP).sum(-1)
    bad = kept != KEEP
    if bool(bad.any()):
        row, group = (int(i) for i in bad.nonzero()[0])
        raise _error(module, CORE_META,
                     f"row {row}, group {group} keeps {int(kept[row, group])} of 4 inputs (2:4 needs exactly 2)")
    for suffix in (CORE_VALUES, ARMOR_A, ARMOR_B):
        if suffix in tensors and not bool(torch.isfinite(tensors[suffix]).all()):
            raise _error(module, suffix, "contains NaN or Inf")
    return shapes


# ---------------------------------------------------------------------------------------------------
# quantization_config
# ---------------------------------------------------------------------------------------------------


def validate_quant_config(cfg: Mapping) -> dict:
    """Validate config.json's ``quantization_config`` for ARMOR; return a normalised copy."""
    if not isinstance(cfg, Mapping):
        raise ArmorFormatError(f"quantization_config must be a JSON object, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(QUANT_CONFIG_KEYS))
    if unknown:
        raise ArmorFormatError(f"quantization_config has unknown keys {unknown} (known: {sorted(QUANT_CONFIG_KEYS)})")
    missing = sorted(k for k, required in QUANT_CONFIG_KEYS.items() if required and k not in cfg)
    if missing:
        raise ArmorFormatError(f"quantization_config is missing keys {missing}")
    if cfg["quant_method"] != QUANT_METHOD:
        raise ArmorFormatError(f"quantization_config.quant_method is {cfg['quant_method']!r}, expected 'armor'")
    if cfg["format_version"] != FORMAT_VERSION:
        raise ArmorFormatError(
            f"quantization_config.format_version {cfg['format_version']!r} is not supported (this build reads "
            f"version {FORMAT_VERSION}); upgrade vllm-armor or re-export the checkpoint"
        )
    if cfg["sparsity"] != SPARSITY:
        raise ArmorFormatError(f"quantization_config.sparsity {cfg['sparsity']!r} is not supported (only '2:4')")
    pruned = cfg["pruned_modules"]
    if not isinstance(pruned, list) or not all(isinstance(m, str) for m in pruned):
        raise ArmorFormatError("quantization_config.pruned_modules must be a list of module names")
    return dict(cfg)


def make_quant_config(method: str, block_size: int | str | None, pruned_modules: list[str],
                      max_overhead: float | None = None, cost: Footprint | None = None) -> dict:
    cfg = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "sparsity": SPARSITY,
        "method": method,
        "block_size": block_size,
        "pruned_modules": sorted(pruned_modules),
    }
    if max_overhead is not None:
        cfg["max_overhead"] = max_overhead
    if cost is not None:
        cfg["cost"] = cost.as_dict()
    return cfg


def is_armor_config(config: Mapping) -> bool:
    return (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


# ---------------------------------------------------------------------------------------------------
# The checkpoint folder: one writer, one reader
# ---------------------------------------------------------------------------------------------------


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
    config.json. Tensors are written as given: cast them to their checkpoint dtypes first."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items()}
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], out / WEIGHTS_FILE, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
    (out / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
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
        files = [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
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
        with safe_open(path, framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return config, tensors


# Safetensors header dtypes the format can meet; others (e.g. FP8) are never ARMOR tensors.
_HEADER_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8,
    "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of one safetensors file, from its header (no tensor data)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    for name, meta in header.items():
        dtype = _HEADER_DTYPES.get(meta["dtype"]) if name != "__metadata__" else None
        if dtype is not None:
            out[name] = TensorInfo(tuple(int(d) for d in meta["shape"]), dtype)
    return out


def read_headers(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint's weight files, from the headers alone."""
    index: dict[str, TensorInfo] = {}
    for path in weight_files(folder):
        index.update(read_header(path))
    return index


# ---------------------------------------------------------------------------------------------------
# Size of a checkpoint against its dense model
# ---------------------------------------------------------------------------------------------------


def info_of(tensor: torch.Tensor) -> TensorInfo:
    return TensorInfo(tuple(tensor.shape), tensor.dtype)


@dataclass(frozen=True)
class Footprint:
    """Parameter and byte counts of a checkpoint (from tensors' or headers' shapes and dtypes)."""

    core_values: int  # kept values of all pruned linears
    ab_params: int  # entries of all A and B blocks
    checkpoint_bytes: int  # every tensor as stored
    dense_bytes: int  # the same model with every pruned linear as a dense weight in its values' dtype

    @property
    def overhead(self) -> float:
        """A and B parameters per kept core value."""
        return self.ab_params / self.core_values if self.core_values else 0.0

    @property
    def bytes_ratio(self) -> float:
        return self.checkpoint_bytes / self.dense_bytes if self.dense_bytes else 0.0

    def as_dict(self) -> dict:
        """What the report and config.json record: A+B per kept value, weight bytes vs the dense model."""
        return {"ab_overhead": round(self.overhead, 6), "weight_bytes": self.checkpoint_bytes,
                "dense_bytes": self.dense_bytes, "bytes_ratio": round(self.bytes_ratio, 6)}


def footprint(infos: Mapping[str, TensorInfo], pruned_modules: list[str]) -> Footprint:
    def nbytes(info: TensorInfo) -> int:
        return math.prod(info.shape) * info.dtype.itemsize

    total = sum(nbytes(i) for i in infos.values())
    armor = {tensor_name(m, s) for m in pruned_modules for s in TENSOR_SUFFIXES}
    values = [infos[tensor_name(m, CORE_VALUES)] for m in pruned_modules if tensor_name(m, CORE_VALUES) in infos]
    ab = [infos[tensor_name(m, s)] for m in pruned_modules for s in (ARMOR_A, ARMOR_B) if tensor_name(m, s) in infos]
    dense = total - sum(nbytes(i) for n, i in infos.items() if n in armor) + sum(2 * nbytes(i) for i in values)
    return Footprint(sum(math.prod(i.shape) for i in values), sum(math.prod(i.shape) for i in ab), total, dense)
