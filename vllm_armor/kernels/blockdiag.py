"""Block-diagonal matmuls and the reference (dense-core) ARMOR forward.

y = A (core (B x)) + bias, with A (n_out, bs_out, bs_out) and B (n_in, bs_in, bs_in) block-diagonal.
One batched einsum per factor: no Python loop over blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def block_diag_matmul(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Return x @ M^T for the block-diagonal M given by ``blocks`` (n, bs, bs), x of shape (..., n*bs).

    Equivalently (M x) for column vectors: block J of the output is blocks[J] @ x_J.
    """
    n, bs, _ = blocks.shape
    lead = x.shape[:-1]
    xb = x.reshape(-1, n, bs)
    # (T, n, bs) x (n, bs_out, bs_in) -> (T, n, bs_out); bmm over blocks: (n, T, bs) @ (n, bs, bs)^T
    y = torch.bmm(xb.transpose(0, 1), blocks.transpose(1, 2)).transpose(0, 1)
    return y.reshape(*lead, n * bs)


def armor_linear_dense_core(
    x: torch.Tensor,
    a_blocks: torch.Tensor | None,
    core: torch.Tensor,
    b_blocks: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Reference ARMOR forward with a dense (zero-filled) 2:4 core of shape (d_out, d_in)."""
    if b_blocks is not None:
        x = block_diag_matmul(x, b_blocks)
    y = F.linear(x, core)
    if a_blocks is not None:
        y = block_diag_matmul(y, a_blocks)
    if bias is not None:
        y = y + bias
    return y
