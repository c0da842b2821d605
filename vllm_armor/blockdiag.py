"""Block-diagonal products: the one convention used by the optimiser, the format and the kernels.

A block-diagonal matrix M = blockdiag(M_1, ..., M_n) is stored as a tensor ``blocks`` of shape (n, bs, bs)
with ``blocks[J] = M_J``. Each product is one batched matmul over the blocks, never a loop:

* ``blockdiag_left(blocks, x)``  = M @ x   for x of shape (n*bs, m);
* ``blockdiag_right(x, blocks)`` = x @ M   for x of shape (..., n*bs);
* ``blockdiag_apply(x, blocks)`` = x @ M^T for activations x (..., n*bs): every row vector x_t becomes M x_t,
  which is how a layer applies B (and A) to a batch of inputs.
"""

from __future__ import annotations

import torch


def blockdiag_left(blocks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """blockdiag(blocks) @ x for x of shape (n*bs, m)."""
    n, bs, _ = blocks.shape
    return torch.bmm(blocks, x.reshape(n, bs, -1)).reshape(x.shape)


def blockdiag_right(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x @ blockdiag(blocks) for x of shape (..., n*bs)."""
    n, bs, _ = blocks.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n, bs)
    return torch.bmm(x2.transpose(0, 1), blocks).transpose(0, 1).reshape(*lead, n * bs)


def blockdiag_apply(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x @ blockdiag(blocks)^T: the block-diagonal matrix applied to every row vector of x."""
    return blockdiag_right(x, blocks.transpose(1, 2))


def blockdiag_dense(blocks: torch.Tensor) -> torch.Tensor:
    """(n, bs, bs) blocks -> the dense (n*bs, n*bs) matrix (for tests and small references)."""
    return torch.block_diag(*blocks.unbind(0))
