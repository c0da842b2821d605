"""Input checks shared by the per-matrix baseline pruners (magnitude, Wanda, NoWag-P, SparseGPT).

Each baseline takes W (d_out x d_in, any float dtype) and returns ``(W_hat, mask)``: W_hat float32, zero outside
the boolean mask, which keeps exactly 2 of every 4 consecutive inputs of each row (2:4 along d_in). All math is
float32. X (tokens x d_in) denotes the calibration inputs of the layer, h = diag(X^T X) and H = X^T X.
"""

from __future__ import annotations

import torch

Result = tuple[torch.Tensor, torch.Tensor]


def check_weight(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (d_out, d_in), got shape {tuple(weight.shape)}")
    if weight.shape[1] % 4:
        raise ValueError(f"2:4 needs d_in divisible by 4, got d_in={weight.shape[1]}")
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight has non-finite entries")
    return w


def check_h(h: torch.Tensor, d_in: int) -> torch.Tensor:
    if tuple(h.shape) != (d_in,):
        raise ValueError(f"h must have shape ({d_in},) = (d_in,), got {tuple(h.shape)}")
    return h.detach().float()
