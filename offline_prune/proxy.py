"""NoWag normalisation and the proxy loss shared by NoWag-P and ARMOR.

Normalisation (NoWag): divide W (d_out x d_in) by its column 2-norms c, then the result by its row 2-norms r:

    Wn = diag(1/r) W diag(1/c),      W = diag(r) Wn diag(c).

Proxy loss of an approximation Wn_hat of Wn, with h = diag(X^T X) the per-input energy of the calibration
inputs of the layer (taken once, from the dense model):

    L(Wn_hat) = sum_ij h_j (Wn_hat - Wn)_ij^2,       relative: L / sum_ij h_j Wn_ij^2.

NoWag-P keeps, in every group of 4 consecutive inputs of a row, the 2 entries with the largest Wn_ij^2 h_j.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-12


@dataclass
class Normalized:
    """Wn with the scales that undo it: W = row_scale[:, None] * Wn * col_scale[None, :]."""

    weight: torch.Tensor  # Wn, float32
    row_scale: torch.Tensor  # r, (d_out,)
    col_scale: torch.Tensor  # c, (d_in,)

    def denormalize(self, wn: torch.Tensor) -> torch.Tensor:
        return self.row_scale[:, None] * wn * self.col_scale[None, :]


def normalize(weight: torch.Tensor) -> Normalized:
    w = weight.float()
    col = w.norm(dim=0).clamp_min(EPS)
    w = w / col
    row = w.norm(dim=1).clamp_min(EPS)
    return Normalized(w / row[:, None], row, col)


def clean_h(h: torch.Tensor) -> torch.Tensor:
    """float32 h with non-finite or non-positive entries replaced by a tiny positive value.

    An input that is never active (h_j = 0) makes its column irrelevant to the loss; a tiny weight keeps
    the closed-form solves well posed.
    """
    h = h.float().clone()
    bad = ~torch.isfinite(h) | (h <= 0)
    if bool(bad.any()):
        good = h[~bad]
        h[bad] = (good.mean() * 1e-6) if good.numel() else 1.0
    return h


def proxy_loss(wn_hat: torch.Tensor, wn: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return ((wn_hat - wn).square() * h[None, :]).sum()


def proxy_scale(wn: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The denominator of the relative loss: sum_ij h_j Wn_ij^2."""
    return (wn.square() * h[None, :]).sum()


def top2_of_4_mask(score: torch.Tensor) -> torch.Tensor:
    """Boolean mask keeping the 2 largest scores in every group of 4 consecutive columns of each row."""
    d_out, d_in = score.shape
    groups = score.reshape(d_out, d_in // 4, 4)
    idx = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    return mask.reshape(d_out, d_in)


def nowag_p_mask(wn: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return top2_of_4_mask(wn.square() * h[None, :])
