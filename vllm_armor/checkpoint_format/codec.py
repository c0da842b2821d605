"""The codec: 2:4 packing of a core and the format tensors of one linear (encode, decode, reconstruct)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from vllm_armor.blockdiag import blockdiag_left, blockdiag_right
from vllm_armor.checkpoint_format.names import (
    ARMOR_A,
    ARMOR_B,
    CORE_META,
    CORE_VALUES,
    GROUP,
    KEEP,
    META_INPUTS,
    ArmorFormatError,
    module_tensors,
)


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
    return {s: state[name] for s, name in module_tensors(module, state).items()}
