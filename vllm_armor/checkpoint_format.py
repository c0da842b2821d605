"""ARMOR checkpoint format, version 1: names, 2:4 metadata packing and validation.

This is the single definition used by the offline writer (`offline_prune`), the offline reader
(`ArmorLinear`) and the vLLM plugin. It imports torch only. See docs/FORMAT.md.

A pruned linear ``P`` (weight W of shape d_out x d_in) is stored as

    P.core_values  (d_out, d_in // 2)              model dtype   the 2 kept values of each group of 4
    P.core_meta    (d_out, d_in // 8)              uint8         4-bit keep-mask per group, 2 groups a byte
    P.armor_a      (d_out // bs_out, bs_out, bs_out) float32     block-diagonal A (optional)
    P.armor_b      (d_in // bs_in, bs_in, bs_in)   float32       block-diagonal B (optional)
    P.bias         (d_out,)                        model dtype   unchanged (optional)

and computes y = A (core (B x)) + bias. Group g of a row covers inputs 4g..4g+3; its nibble has bit k
set when input 4g+k is kept (exactly two bits set); group 2m is the low nibble of byte m, group 2m+1 the
high nibble. The two kept values are stored in increasing input order. A and B are either both present
or both absent (plain 2:4 checkpoints from the baselines carry neither).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

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
    "block_size": False,  # the requested block size (actual sizes come from tensor shapes)
    "pruned_modules": True,  # full names of the pruned linear layers
}

GROUP = 4
KEEP = 2
# The 6 keep-masks with exactly 2 of 4 bits set, in a fixed order (pattern index -> mask).
PATTERN_MASKS = (0b0011, 0b0101, 0b1001, 0b0110, 0b1010, 0b1100)


class ArmorFormatError(ValueError):
    """A checkpoint or tensor does not follow the ARMOR format; the message names what is wrong."""


def tensor_name(module: str, suffix: str) -> str:
    return f"{module}.{suffix}"


def largest_block_size(dim: int, requested: int) -> int:
    """Largest divisor of ``dim`` that is a multiple of 4 and at most ``requested``.

    The rule the pruner uses when ``requested`` does not divide a dimension (SmolLM2: 576 with 128 -> 96).
    """
    if requested < 1:
        raise ArmorFormatError(f"block size must be positive, got {requested}")
    for size in range(min(requested, dim), 0, -1):
        if dim % size == 0 and size % GROUP == 0:
            return size
    raise ArmorFormatError(f"dimension {dim} has no divisor that is a multiple of 4 and <= {requested}")


# ---------------------------------------------------------------------------------------------------
# 2:4 packing
# ---------------------------------------------------------------------------------------------------


def check_packable(d_in: int, where: str = "") -> None:
    if d_in % (2 * GROUP) != 0:
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
    return bits.bool().reshape(d_out, n_bytes * 2 * GROUP)


def unpack_2to4(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Dense (d_out, d_in) core from compressed values and metadata (inverse of `pack_2to4`)."""
    mask = unpack_mask(meta)
    dense = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    dense[mask] = values.reshape(-1)
    return dense


# ---------------------------------------------------------------------------------------------------
# Validation
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


def _shape_error(name: str, msg: str) -> ArmorFormatError:
    return ArmorFormatError(f"ARMOR tensor '{name}': {msg}")


def _check_blocks(name: str, t: torch.Tensor, dim: int, side: str) -> int:
    if t.dim() != 3 or t.shape[1] != t.shape[2]:
        raise _shape_error(name, f"expected (n_blocks, bs, bs) square blocks, got shape {tuple(t.shape)}")
    n_blocks, bs = int(t.shape[0]), int(t.shape[1])
    if n_blocks * bs != dim:
        raise _shape_error(
            name, f"{n_blocks} blocks of {bs} do not cover the {side} dimension {dim} (block size must divide it)"
        )
    if not t.is_floating_point():
        raise _shape_error(name, f"expected a floating dtype, got {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise _shape_error(name, "contains NaN or Inf")
    return bs


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
    for suffix in (CORE_VALUES, CORE_META):
        if suffix not in tensors:
            raise ArmorFormatError(f"ARMOR tensor '{tensor_name(module, suffix)}' is missing")
    values, meta = tensors[CORE_VALUES], tensors[CORE_META]
    vname, mname = tensor_name(module, CORE_VALUES), tensor_name(module, CORE_META)
    if meta.dtype != torch.uint8 or meta.dim() != 2:
        raise _shape_error(mname, f"expected a 2-D uint8 tensor, got {meta.dtype} {tuple(meta.shape)}")
    d_out, d_in = int(meta.shape[0]), int(meta.shape[1]) * 2 * GROUP
    if values.dim() != 2 or tuple(values.shape) != (d_out, d_in // 2):
        expected = (d_out, d_in // 2)
        raise _shape_error(vname, f"expected shape {expected} to match {mname}, got {tuple(values.shape)}")
    if not values.is_floating_point():
        raise _shape_error(vname, f"expected a floating dtype, got {values.dtype}")
    if expected_shape is not None and (d_out, d_in) != tuple(expected_shape):
        layer = f"{expected_shape[0]}x{expected_shape[1]}"
        raise _shape_error(vname, f"describes a {d_out}x{d_in} weight, the layer is {layer}")
    kept = unpack_mask(meta).reshape(d_out, d_in // GROUP, GROUP).sum(-1)
    bad = kept != KEEP
    if bool(bad.any()):
        row, group = (int(i) for i in bad.nonzero()[0])
        raise _shape_error(
            mname, f"row {row}, group {group} keeps {int(kept[row, group])} of 4 inputs (2:4 needs exactly 2)"
        )
    if not bool(torch.isfinite(values).all()):
        raise _shape_error(vname, "contains NaN or Inf")

    has_a, has_b = ARMOR_A in tensors, ARMOR_B in tensors
    if has_a != has_b:
        missing = ARMOR_B if has_a else ARMOR_A
        raise ArmorFormatError(f"ARMOR tensor '{tensor_name(module, missing)}' is missing (A and B come together)")
    if not has_a:
        return LinearShapes(d_out, d_in, None, None)
    bs_out = _check_blocks(tensor_name(module, ARMOR_A), tensors[ARMOR_A], d_out, "output")
    bs_in = _check_blocks(tensor_name(module, ARMOR_B), tensors[ARMOR_B], d_in, "input")
    return LinearShapes(d_out, d_in, bs_out, bs_in)


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


def make_quant_config(method: str, block_size: int | None, pruned_modules: list[str]) -> dict:
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "sparsity": SPARSITY,
        "method": method,
        "block_size": block_size,
        "pruned_modules": sorted(pruned_modules),
    }


# ---------------------------------------------------------------------------------------------------
# Dense reconstruction (reference semantics of the format)
# ---------------------------------------------------------------------------------------------------


def block_diag_dense(blocks: torch.Tensor) -> torch.Tensor:
    """(n, bs, bs) blocks -> dense (n*bs, n*bs) block-diagonal matrix."""
    return torch.block_diag(*blocks.unbind(0))


def reconstruct_weight(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_hat = A @ core @ B as a dense matrix in ``dtype`` (float32 by default)."""
    core = unpack_2to4(tensors[CORE_VALUES].to(dtype), tensors[CORE_META])
    if ARMOR_A not in tensors:
        return core
    a = tensors[ARMOR_A].to(dtype)
    b = tensors[ARMOR_B].to(dtype)
    n_out, bs_out, _ = a.shape
    n_in, bs_in, _ = b.shape
    d_out, d_in = core.shape
    # core @ B: each input block J of core's columns times B_J
    cb = torch.einsum("onj,njk->onk", core.reshape(d_out, n_in, bs_in), b).reshape(d_out, d_in)
    # A @ (core B): each output block I of rows times A_I
    return torch.einsum("nij,njk->nik", a, cb.reshape(n_out, bs_out, d_in)).reshape(d_out, d_in)



# ---------------------------------------------------------------------------------------------------
# Tensor-parallel sharding rules (used by the vLLM plugin; pure functions, unit-tested without vLLM)
# ---------------------------------------------------------------------------------------------------


def check_output_shard(module: str, rows_per_rank: int, block_out: int | None) -> None:
    """Column parallelism splits the output dim: each rank's rows must be whole A blocks.

    With k/v head replication a rank holds one head, so the A block size must divide head_dim.
    """
    if block_out is not None and rows_per_rank % block_out:
        raise ArmorFormatError(
            f"ARMOR tensor '{tensor_name(module, ARMOR_A)}': tensor parallelism gives each rank {rows_per_rank} "
            f"output rows, which would split an A block of size {block_out}; use a tensor-parallel size for "
            f"which {block_out} divides the per-rank rows (or re-prune with a smaller block size)"
        )


def check_input_shard(module: str, cols_per_rank: int, block_in: int | None) -> None:
    """Row parallelism splits the input dim: each rank's columns must be whole B blocks and whole
    metadata bytes (two groups of 4 inputs)."""
    if cols_per_rank % (2 * GROUP):
        raise ArmorFormatError(
            f"ARMOR tensor '{tensor_name(module, CORE_META)}': tensor parallelism gives each rank {cols_per_rank} "
            f"input columns, which would split a group of 4 / a metadata byte (needs a multiple of 8)"
        )
    if block_in is not None and cols_per_rank % block_in:
        raise ArmorFormatError(
            f"ARMOR tensor '{tensor_name(module, ARMOR_B)}': tensor parallelism gives each rank {cols_per_rank} "
            f"input columns, which would split a B block of size {block_in}; use a tensor-parallel size for "
            f"which {block_in} divides the per-rank columns (or re-prune with a smaller block size)"
        )
