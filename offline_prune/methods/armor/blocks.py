"""ARMOR's block-size policy: which block sizes A and B get for one matrix.

``--block-size auto`` (the default): per matrix the largest size whose A and B hold at most ``--max-overhead`` x
the core's kept values (``auto_block_sizes``); ``--block-size N``: per dimension the largest divisor that is a
multiple of 4 and at most N (``largest_block_size``).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from offline_prune.errors import UserError
from vllm_armor.checkpoint_format import GROUP

AUTO = "auto"


def largest_block_size(dim: int, requested: int) -> int:
    """Largest divisor of ``dim`` that is a multiple of 4 and at most ``requested``.

    The rule the pruner uses when ``requested`` does not divide a dimension (SmolLM2: 576 with 128 -> 96).
    """
    if requested < 1:
        raise UserError(f"--block-size must be positive, got {requested}")
    for size in range(min(requested, dim), 0, -1):
        if dim % size == 0 and size % GROUP == 0:
            return size
    raise UserError(f"dimension {dim} has no divisor that is a multiple of 4 and <= --block-size {requested}")


def ab_overhead(d_out: int, d_in: int, block_out: int, block_in: int) -> float:
    """A+B parameters per kept value of the 2:4 core: (d_out bo + d_in bi) / (d_out d_in / 2)."""
    return (d_out * block_out + d_in * block_in) / (d_out * d_in / 2)


def _fit(dim: int, size: int) -> int:
    """Largest divisor of ``dim`` <= ``size``, a multiple of 4 when one exists (4 and up), else any divisor."""
    for cand in range(min(size, dim), 0, -1):
        if dim % cand == 0 and (cand % GROUP == 0 or cand < GROUP):
            return cand
    return 1


def auto_block_sizes(d_out: int, d_in: int, max_overhead: float) -> tuple[int, int]:
    """(block_out, block_in) of ``--block-size auto``: the largest size b (per dimension the largest divisor
    <= b, a multiple of 4 from 4 up) whose A and B hold at most ``max_overhead`` x the core's kept values.

    SmolLM2 at 0.125: 576x576 -> 16, 1536x576 and 576x1536 -> 24, 192x576 -> 8; Llama-2-7B 4096x4096 -> 128.
    """
    if not max_overhead > 0:
        raise UserError(f"--max-overhead must be positive, got {max_overhead}")
    for size in range(max(d_out, d_in), 0, -1):
        bo, bi = _fit(d_out, size), _fit(d_in, size)
        if ab_overhead(d_out, d_in, bo, bi) <= max_overhead:
            return bo, bi
    raise UserError(f"--max-overhead {max_overhead}: even diagonal A and B ({ab_overhead(d_out, d_in, 1, 1):.4f} "
                    f"of the core) exceed it for a {d_out}x{d_in} matrix")


def block_sizes(d_out: int, d_in: int, options: Mapping[str, Any]) -> tuple[int, int]:
    """The block sizes of one matrix under the options: ``auto`` (budget rule) or a forced size."""
    if options["block_size"] == AUTO:
        return auto_block_sizes(d_out, d_in, options["max_overhead"])
    return largest_block_size(d_out, options["block_size"]), largest_block_size(d_in, options["block_size"])


def block_size_arg(text: str) -> int | str:
    """``--block-size``: ``auto`` or a positive integer (argparse reports the error as one line)."""
    if str(text).strip().lower() == AUTO:
        return AUTO
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an integer, got {text!r}") from None
