"""Shapes and dtypes of one linear's tensors, checked from tensors or from safetensors headers alone (before any
tensor data is read): the readers size their loading parameters with `check_shapes`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from vllm_armor.checkpoint_format.names import (
    ARMOR_A,
    ARMOR_B,
    CORE_META,
    CORE_VALUES,
    KEEP,
    META_INPUTS,
    TENSOR_SUFFIXES,
    ArmorFormatError,
    tensor_error,
    tensor_name,
)


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
        return tensor_error(module, suffix, f"{n} blocks of {bs} do not cover the {_SIDES[axis]} dimension {dim}{rule}")
    layer = (dim, other) if axis == 0 else (other, dim)
    own = (_extent(suffix, shape, 0), _extent(suffix, shape, 1))
    return tensor_error(module, suffix, f"expected shape {expected_shapes(*layer)[suffix]} for a {layer[0]}x{layer[1]} "
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
        raise tensor_error(module, suffix, f"expected a {rank}-D tensor {what}, got shape {shape}")


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
            raise tensor_error(module, suffix, f"expected (n_blocks, bs, bs) square blocks, got shape {shapes[suffix]}")
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
                raise tensor_error(module, suffix, f"expected dtype uint8, got {dtype}")
        elif suffix in TENSOR_SUFFIXES and not dtype.is_floating_point:
            raise tensor_error(module, suffix, f"expected a floating dtype, got {dtype}")
    values = dtypes.get(CORE_VALUES)
    if model_dtype is not None and values is not None and values != model_dtype:
        raise tensor_error(module, CORE_VALUES, f"stored as {values}, expected the model dtype {model_dtype} "
                                          "(config.json 'dtype')")
