"""Tensor-parallel layout of an ARMOR layer in vLLM: which slice of each checkpoint tensor a rank holds, and
the rules a sharding must satisfy. Pure Python (no vLLM), unit-tested on its own; `linear_method.py` fills
it from the vLLM layer.

Column parallelism splits the output rows: each rank's rows must be whole A blocks. Row parallelism splits
the input columns: each rank's columns must be whole B blocks and whole metadata bytes (2 groups of 4).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_armor import checkpoint_format as fmt
from vllm_armor.checkpoint_format import ArmorFormatError


def check_output_shard(module: str, rows_per_rank: int, block_out: int | None) -> None:
    """Column parallelism splits the output dim: each rank's rows must be whole A blocks.

    With k/v head replication a rank holds one head, so the A block size must divide head_dim.
    """
    if block_out is not None and rows_per_rank % block_out:
        raise ArmorFormatError(
            f"ARMOR tensor '{fmt.tensor_name(module, fmt.ARMOR_A)}': tensor parallelism gives each rank "
            f"{rows_per_rank} output rows, which would split an A block of size {block_out}; use a "
            f"tensor-parallel size for which {block_out} divides the per-rank rows (or re-prune with a smaller "
            "block size)"
        )


def check_input_shard(module: str, cols_per_rank: int, block_in: int | None) -> None:
    """Row parallelism splits the input dim: each rank's columns must be whole B blocks and whole
    metadata bytes (two groups of 4 inputs)."""
    if cols_per_rank % fmt.META_INPUTS:
        raise ArmorFormatError(
            f"ARMOR tensor '{fmt.tensor_name(module, fmt.CORE_META)}': tensor parallelism gives each rank "
            f"{cols_per_rank} input columns, which would split a group of 4 / a metadata byte (needs a multiple "
            "of 8)"
        )
    if block_in is not None and cols_per_rank % block_in:
        raise ArmorFormatError(
            f"ARMOR tensor '{fmt.tensor_name(module, fmt.ARMOR_B)}': tensor parallelism gives each rank "
            f"{cols_per_rank} input columns, which would split a B block of size {block_in}; use a "
            f"tensor-parallel size for which {block_in} divides the per-rank columns (or re-prune with a smaller "
            "block size)"
        )


@dataclass
class ShardSpec:
    """One checkpoint linear (e.g. k_proj) inside a vLLM layer (e.g. qkv_proj) on this rank."""

    module: str  # checkpoint module name
    loader_id: str | int | None  # shard id vLLM passes to the weight loader
    rows: int  # output rows of this shard on this rank
    row_offset: int  # first row of this shard in the layer's (rank-local) output
    row_rank: int  # which slice of the checkpoint tensor's rows this rank holds
    block_out: int | None
    block_in: int | None
    a_offset: int = 0  # offsets into the flat armor_a / armor_b parameters
    b_offset: int = 0


@dataclass
class LayerLayout:
    prefix: str
    row_parallel: bool
    cols: int  # input columns on this rank
    col_rank: int
    values_dtype: torch.dtype
    shards: list[ShardSpec] = field(default_factory=list)

    @property
    def has_ab(self) -> bool:
        return self.shards[0].block_out is not None

    def shard_for(self, loader_id: str | int | None) -> ShardSpec:
        for spec in self.shards:
            if spec.loader_id == loader_id:
                return spec
        known = [s.loader_id for s in self.shards]
        raise ArmorFormatError(
            f"layer '{self.prefix}': got a weight for shard {loader_id!r}, expected one of {known} "
            "(checkpoints with already fused q/k/v or gate/up tensors are not supported)"
        )

    def add_shard(self, module: str, loader_id: str | int | None, rows: int, row_rank: int,
                  blocks: tuple[int | None, int | None]) -> None:
        """Append a shard after checking that this rank's slice holds whole blocks."""
        bo, bi = blocks
        if self.row_parallel:
            check_input_shard(module, self.cols, bi)
        else:
            check_output_shard(module, rows, bo)
        last = self.shards[-1] if self.shards else None
        row_offset = last.row_offset + last.rows if last else 0
        a_offset = last.a_offset + last.rows * last.block_out if last and last.block_out else 0
        b_offset = last.b_offset + self.cols * last.block_in if last and last.block_in else 0
        self.shards.append(ShardSpec(module, loader_id, rows, row_offset, row_rank, bo, bi, a_offset, b_offset))

    def slices(self, spec: ShardSpec, suffix: str, data: torch.Tensor,
               loaded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's part of the checkpoint tensor ``loaded``, where it goes in the layer's ``data``)."""
        cols = self.cols
        if suffix in (fmt.CORE_VALUES, fmt.CORE_META):
            per = 2 if suffix == fmt.CORE_VALUES else fmt.META_INPUTS
            src = loaded.narrow(0, spec.row_rank * spec.rows, spec.rows)
            src = src.narrow(1, self.col_rank * cols // per, cols // per)
            return src, data.narrow(0, spec.row_offset, spec.rows)
        if suffix == fmt.ARMOR_A:
            bs = spec.block_out
            n = spec.rows // bs
            src = loaded.narrow(0, spec.row_rank * n, n)
            return src, data.narrow(0, spec.a_offset, n * bs * bs).view(n, bs, bs)
        bs = spec.block_in
        n = cols // bs
        src = loaded.narrow(0, self.col_rank * n, n)
        return src, data.narrow(0, spec.b_offset, n * bs * bs).view(n, bs, bs)

    def shard_tensors(self, spec: ShardSpec, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The format tensors of one shard (views into the layer's flat loading parameters)."""
        t = {
            fmt.CORE_VALUES: params[fmt.CORE_VALUES].narrow(0, spec.row_offset, spec.rows),
            fmt.CORE_META: params[fmt.CORE_META].narrow(0, spec.row_offset, spec.rows),
        }
        if self.has_ab:
            bo, bi = spec.block_out, spec.block_in
            t[fmt.ARMOR_A] = params[fmt.ARMOR_A].narrow(0, spec.a_offset, spec.rows * bo).view(-1, bo, bo)
            t[fmt.ARMOR_B] = params[fmt.ARMOR_B].narrow(0, spec.b_offset, self.cols * bi).view(-1, bi, bi)
        return t
