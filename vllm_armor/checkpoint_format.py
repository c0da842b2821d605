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
import os
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
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


class ArmorFormatError(Exception):
    """A checkpoint or tensor does not follow the ARMOR format; the message (one line) names what is wrong.

    Not a ValueError on purpose: vLLM builds its config in a pydantic validator, which would wrap a ValueError
    raised by the plugin's header checks into a multi-line ValidationError; this one passes through unchanged."""


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


def _extent(suffix: str, shape: tuple[int, ...], axis: int) -> int:
    """The layer dimension (axis 0: outputs, 1: inputs) that a tensor of this shape describes."""
    if suffix in (ARMOR_A, ARMOR_B):
        return shape[0] * shape[1]
    return shape[axis] * (1 if axis == 0 else KEEP if suffix == CORE_VALUES else META_INPUTS)


_SIDES = ("output", "input")


def _mismatch(module: str, suffix: str, shape: tuple[int, ...], axis: int, dim: int, other: int) -> ArmorFormatError:
    """The error for one tensor that does not fit the layer dimension ``dim`` of ``axis`` (``other``: the other)."""
    if suffix in (ARMOR_A, ARMOR_B):
        n, bs = shape[0], shape[1]
        rule = " (block size must divide it)" if bs == 0 or dim % bs else f" (expected {dim // bs} blocks)"
        return _error(module, suffix, f"{n} blocks of {bs} do not cover the {_SIDES[axis]} dimension {dim}{rule}")
    layer = (dim, other) if axis == 0 else (other, dim)
    own = (_extent(suffix, shape, 0), _extent(suffix, shape, 1))
    return _error(module, suffix, f"expected shape {expected_shapes(*layer)[suffix]} for a {layer[0]}x{layer[1]} "
                                  f"layer, got {shape} (a {own[0]}x{own[1]} weight)")


def _agree(module: str, shapes: Mapping[str, tuple[int, ...]], axis: int, known: int | None,
           other: int | None = None) -> int:
    """The layer's dimension ``axis`` as every tensor describes it. Where the layer's own dimension is known it
    decides; else the majority of the tensors does (B or A arbitrates between values and metadata); the error names
    the tensor that disagrees, or all of them when no majority exists."""
    names = [s for s in (CORE_META, CORE_VALUES, ARMOR_A if axis == 0 else ARMOR_B) if s in shapes]
    got = {s: _extent(s, shapes[s], axis) for s in names}
    if known is None:
        known, votes = Counter(got.values()).most_common(1)[0]
        if votes == 1 and len(got) > 1:
            described = ", ".join(f"'{tensor_name(module, s)}' {shapes[s]} -> {got[s]}" for s in names)
            raise ArmorFormatError(f"ARMOR tensors of '{module}' disagree on the layer's {_SIDES[axis]} dimension: "
                                   f"{described}")
    for s in names:
        if got[s] != known:
            this_other = other if other is not None else _extent(s, shapes[s], 1 - axis)
            raise _mismatch(module, s, shapes[s], axis, known, this_other)
    return known


def _check_rank(module: str, suffix: str, shape: tuple[int, ...], rank: int) -> None:
    if len(shape) != rank:
        what = "(rows, columns)" if rank == 2 else "(n_blocks, bs, bs)"
        raise _error(module, suffix, f"expected a {rank}-D tensor {what}, got shape {shape}")


def check_shapes(module: str, shapes: Mapping[str, tuple[int, ...]], d_out: int | None = None,
                 d_in: int | None = None) -> LinearShapes:
    """Check the shapes of one linear's tensors (suffix -> shape, from tensors or safetensors headers).

    Presence and ranks of every tensor come first, then square A/B blocks, then the layer's dimensions as each tensor
    describes them: against ``d_out``/``d_in`` where known, else against each other (majority), so that a derived
    check never blames the wrong tensor. Returns the dimensions and block sizes.
    """
    for suffix in (CORE_VALUES, CORE_META):
        if suffix not in shapes:
            raise ArmorFormatError(f"ARMOR tensor '{tensor_name(module, suffix)}' is missing")
    has_a, has_b = ARMOR_A in shapes, ARMOR_B in shapes
    if has_a != has_b:
        missing = ARMOR_B if has_a else ARMOR_A
        raise ArmorFormatError(f"ARMOR tensor '{tensor_name(module, missing)}' is missing (A and B come together)")
    shapes = {s: tuple(int(d) for d in shape) for s, shape in shapes.items() if s in TENSOR_SUFFIXES}
    for suffix, rank in ((CORE_VALUES, 2), (CORE_META, 2), (ARMOR_A, 3), (ARMOR_B, 3)):
        if suffix in shapes:
            _check_rank(module, suffix, shapes[suffix], rank)
    for suffix in (ARMOR_A, ARMOR_B):
        if suffix in shapes and shapes[suffix][1] != shapes[suffix][2]:
            raise _error(module, suffix, f"expected (n_blocks, bs, bs) square blocks, got shape {shapes[suffix]}")
    rows = _agree(module, shapes, 0, d_out)
    cols = _agree(module, shapes, 1, d_in, rows)
    if not has_a:
        return LinearShapes(rows, cols, None, None)
    return LinearShapes(rows, cols, shapes[ARMOR_A][1], shapes[ARMOR_B][1])


def check_dtypes(module: str, dtypes: Mapping[str, torch.dtype], model_dtype: torch.dtype | None = None) -> None:
    """The stored dtype of every tensor (from headers or tensors), checked before anything is copied or cast:
    uint8 metadata, values in a float dtype (the model's, when known), A and B in a float dtype."""
    for suffix, dtype in dtypes.items():
        if suffix == CORE_META:
            if dtype != torch.uint8:
                raise _error(module, suffix, f"expected dtype uint8, got {dtype}")
        elif suffix in TENSOR_SUFFIXES and not dtype.is_floating_point:
            raise _error(module, suffix, f"expected a floating dtype, got {dtype}")
    values = dtypes.get(CORE_VALUES)
    if model_dtype is not None and values is not None and values != model_dtype:
        raise _error(module, CORE_VALUES, f"stored as {values}, expected the model dtype {model_dtype} "
                                          "(config.json 'dtype')")


def _nonfinite_in(dtype: torch.dtype, tensor: torch.Tensor) -> bool:
    return not bool(torch.isfinite(tensor.to(dtype)).all())


def _reconstruction_bound(tensors: Mapping[str, torch.Tensor]) -> float:
    """An upper bound of max |A @ core @ B| (float64): max row-sum |A| * max row-sum |core| * max |B|."""
    core = tensors[CORE_VALUES].double().abs().sum(dim=1).max().item()
    a, b = tensors.get(ARMOR_A), tensors.get(ARMOR_B)
    if a is None:
        return core
    return a.double().abs().sum(dim=2).max().item() * core * b.double().abs().max().item()


def check_numerics(module: str, tensors: Mapping[str, torch.Tensor], dtypes: Iterable[torch.dtype]) -> None:
    """Refuse a layer whose tensors or reconstruction W_hat = A @ core @ B is not finite in one of ``dtypes``
    (the model dtype and the serving dtype): a value that overflows there, or a product that does. The product is
    computed only when a cheap bound cannot rule an overflow out."""
    for dtype in dict.fromkeys(dtypes):
        for suffix in (CORE_VALUES, ARMOR_A, ARMOR_B):
            if suffix in tensors and _nonfinite_in(dtype, tensors[suffix]):
                raise _error(module, suffix, f"has values that overflow {dtype} (NaN or Inf once cast)")
        bound = _reconstruction_bound(tensors)
        if math.isfinite(bound) and bound < torch.finfo(dtype).max:
            continue
        if not bool(torch.isfinite(reconstruct_weight(tensors, dtype)).all()):
            raise ArmorFormatError(f"ARMOR layer '{module}': the reconstructed weight A @ core @ B is not finite in "
                                   f"{dtype} (overflow)")


def validate_linear(
    module: str,
    tensors: Mapping[str, torch.Tensor],
    expected_shape: tuple[int, int] | None = None,
    model_dtype: torch.dtype | None = None,
    serving_dtype: torch.dtype | None = None,
) -> LinearShapes:
    """Validate the ARMOR tensors of one pruned linear; return its shapes.

    ``tensors`` maps suffixes (``core_values``, ``core_meta``, ``armor_a``, ``armor_b``) to tensors.
    ``expected_shape`` is (d_out, d_in) of the dense layer when known; ``model_dtype`` the checkpoint's dtype
    (config.json) and ``serving_dtype`` the dtype the reader computes in, when known: the layer must be finite in
    both. Raises ArmorFormatError naming the offending tensor or layer.
    """
    check_dtypes(module, {s: t.dtype for s, t in tensors.items()}, model_dtype)
    layer = expected_shape or (None, None)
    shapes = check_shapes(module, {s: tuple(t.shape) for s, t in tensors.items()}, *layer)
    kept = unpack_mask(tensors[CORE_META]).reshape(shapes.d_out, shapes.d_in // GROUP, GROUP).sum(-1)
    bad = kept != KEEP
    if bool(bad.any()):
        row, group = (int(i) for i in bad.nonzero()[0])
        raise _error(module, CORE_META,
                     f"row {row}, group {group} keeps {int(kept[row, group])} of 4 inputs (2:4 needs exactly 2)")
    for suffix in (CORE_VALUES, ARMOR_A, ARMOR_B):
        if suffix in tensors and not bool(torch.isfinite(tensors[suffix]).all()):
            raise _error(module, suffix, "contains NaN or Inf")
    check_numerics(module, tensors, [d for d in (model_dtype, serving_dtype) if d is not None])
    return shapes


def not_in_model(missing: Iterable[str]) -> ArmorFormatError:
    """The error of both readers for listed modules that are not linear layers of the model."""
    missing = sorted(missing)
    return ArmorFormatError(f"pruned module {missing[0]!r} (quantization_config.pruned_modules) is not a linear "
                            f"layer of the model ({len(missing)} such module{'s' if len(missing) > 1 else ''})")


def check_checkpoint(infos: Mapping[str, TensorInfo], pruned_modules: Iterable[str],
                     model_dtype: torch.dtype | None = None) -> dict[str, LinearShapes]:
    """The checks every reader runs on the headers of a whole checkpoint before any tensor is read: config and
    tensors agree both ways (every listed module has its tensors, every ARMOR tensor belongs to a listed module,
    no listed module keeps a dense weight) and every listed module's dtypes and shapes. Returns module -> shapes."""
    listed = set(pruned_modules)
    for name in sorted(infos):
        module, _, suffix = name.rpartition(".")
        if suffix in TENSOR_SUFFIXES and module not in listed:
            raise ArmorFormatError(f"ARMOR tensor '{name}' ({infos[name].where}) belongs to no module in "
                                   "quantization_config.pruned_modules")
        if suffix == "weight" and module in listed:
            raise ArmorFormatError(f"pruned module '{module}' also has a dense tensor '{name}' ({infos[name].where})")
    shapes = {}
    for module in sorted(listed):
        headers = {s: infos[tensor_name(module, s)] for s in TENSOR_SUFFIXES if tensor_name(module, s) in infos}
        check_dtypes(module, {s: i.dtype for s, i in headers.items()}, model_dtype)
        shapes[module] = check_shapes(module, {s: i.shape for s, i in headers.items()})
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


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")  # hidden, and not *.safetensors: never read as a weight file


def _replace(tmp: Path, path: Path) -> None:
    """Make the fully written ``tmp`` durable and give it ``path``'s name in one step (a reader, or a rerun after a
    kill, sees the old file or the new one, never half a file)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, rename); an OSError (full disk, read-only
    folder) leaves no temporary file behind."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        tmp.write_text(text)
        _replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save_file(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None,
                     before_replace: Callable[[], None] | None = None) -> None:
    """`safetensors.torch.save_file` made atomic like `atomic_write_text`. A write error of the safetensors library
    (it reports a full disk as its own error type) is raised as OSError naming the file. ``before_replace`` runs
    between writing the temporary file and renaming it (a test hook)."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        try:
            save_file(dict(tensors), tmp, metadata=metadata)
        except OSError:
            raise
        except Exception as err:  # noqa: BLE001 - safetensors' SafetensorError wraps the I/O error
            raise OSError(f"cannot write {path}: {err}") from None
        if before_replace is not None:
            before_replace()
        _replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
