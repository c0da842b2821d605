"""Baseline 2:4 pruning of one linear layer: magnitude, Wanda, NoWag-P and SparseGPT.

All functions take W (d_out x d_in, any float dtype) and return ``(W_hat, mask)``: W_hat float32, zero
outside the boolean mask, which keeps exactly 2 of every 4 consecutive inputs of each row (2:4 along d_in).
All math is float32. X (tokens x d_in) denotes the calibration inputs of the layer, h = diag(X^T X) and
H = X^T X.

- magnitude:  keep the 2 largest |W_ij| per group; values unchanged.
- Wanda:      keep the 2 largest |W_ij| * ||x_j||, ||x_j|| = sqrt(h_j) (Sun et al. 2023); values unchanged.
- NoWag-P:    keep the 2 largest Wn_ij^2 h_j, Wn the NoWag-normalised W (see ``proxy``); values unchanged.
- SparseGPT (Frantar & Alistarh 2023): minimise ||X W^T - X W_hat^T||_F^2 row by row with OBS updates. With
  U the upper Cholesky factor of H^-1 (H^-1 = U^T U), d_j = U_jj, columns are visited left to right; at the
  first column of every group of 4 the mask of that group is chosen by the OBS saliency w_ij^2 / d_j^2
  (the 2 largest are kept; the saliencies use the weights already updated by the pruning of earlier columns).
  Pruning column j (w = W[:, j], q = w on the mask, 0 elsewhere) costs (w - q)^2 / d_j^2 and is compensated
  exactly in the columns not yet visited by

      W[:, j:] -= ((w - q) / d_j) U[j, j:].

  The update is applied eagerly inside a block of ``blocksize`` columns and lazily, once per block, to the
  columns after it (one matmul with the block's errors), which gives the same result.
"""

from __future__ import annotations

import logging

import torch

from .proxy import clean_h, normalize, nowag_p_mask, top2_of_4_mask

log = logging.getLogger(__name__)

Result = tuple[torch.Tensor, torch.Tensor]


def _check_weight(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (d_out, d_in), got shape {tuple(weight.shape)}")
    if weight.shape[1] % 4:
        raise ValueError(f"2:4 needs d_in divisible by 4, got d_in={weight.shape[1]}")
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight has non-finite entries")
    return w


def _check_h(h: torch.Tensor, d_in: int) -> torch.Tensor:
    if tuple(h.shape) != (d_in,):
        raise ValueError(f"h must have shape ({d_in},) = (d_in,), got {tuple(h.shape)}")
    return h.detach().float()


def magnitude_2of4(weight: torch.Tensor) -> Result:
    w = _check_weight(weight)
    mask = top2_of_4_mask(w.abs())
    return w * mask, mask


def wanda_2of4(weight: torch.Tensor, h: torch.Tensor) -> Result:
    w = _check_weight(weight)
    h = _check_h(h, w.shape[1])
    norm = torch.nan_to_num(h, nan=0.0, posinf=0.0).clamp_min(0).sqrt()
    mask = top2_of_4_mask(w.abs() * norm[None, :])
    return w * mask, mask


def nowag_p_2of4(weight: torch.Tensor, h: torch.Tensor) -> Result:
    w = _check_weight(weight)
    h = _check_h(h, w.shape[1])
    mask = nowag_p_mask(normalize(w).weight, clean_h(h))
    return w * mask, mask


def _inverse_cholesky_upper(hessian: torch.Tensor, percdamp: float, retries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp I)^-1, damp = percdamp * mean(diag H); on failure the damping is
    multiplied by 10 (logged) up to ``retries`` times, then a ValueError names the problem."""
    n = hessian.shape[0]
    mean_diag = hessian.diagonal().mean()
    eye = torch.eye(n, dtype=hessian.dtype, device=hessian.device)
    for attempt in range(retries + 1):
        damp = percdamp * 10.0**attempt
        l_factor, info = torch.linalg.cholesky_ex(hessian + damp * mean_diag * eye)
        if int(info) == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(l_factor), upper=True)
            if int(info) == 0 and bool(torch.isfinite(u).all()):
                if attempt:
                    log.warning("SparseGPT: Hessian needed dampening %.3g * mean(diag H) (asked %.3g)",
                                damp, percdamp)
                return u
        log.info("SparseGPT: Cholesky failed with dampening %.3g * mean(diag H)", damp)
    raise ValueError(
        f"SparseGPT: Hessian (d_in={n}) is not positive definite even with dampening "
        f"{percdamp * 10.0**retries:.3g} * mean(diag H); check the calibration statistics"
    )


def sparsegpt_2of4(weight: torch.Tensor, hessian: torch.Tensor, *, blocksize: int = 128,
                   percdamp: float = 0.01) -> Result:
    w = _check_weight(weight).clone()
    d_out, d_in = w.shape
    if tuple(hessian.shape) != (d_in, d_in):
        raise ValueError(f"hessian must be (d_in, d_in) = ({d_in}, {d_in}), got {tuple(hessian.shape)}")
    if blocksize <= 0 or blocksize % 4:
        raise ValueError(f"blocksize must be a positive multiple of 4, got {blocksize}")
    if percdamp <= 0:
        raise ValueError(f"percdamp must be positive, got {percdamp}")
    h = hessian.detach().float().clone()
    if not bool(torch.isfinite(h).all()):
        raise ValueError("SparseGPT: Hessian has non-finite entries")

    # Inputs never active carry no information: their weights are free, so zero them and make H invertible.
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    if bool(dead.all()):
        log.warning("SparseGPT: all %d inputs are dead (zero Hessian diagonal)", d_in)

    u = _inverse_cholesky_upper(h, percdamp)
    mask = torch.zeros(d_out, d_in, dtype=torch.bool, device=w.device)

    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        d1 = u1.diagonal()
        keep1 = mask[:, i1:i2]
        for i in range(i2 - i1):
            if i % 4 == 0:
                saliency = w1[:, i:i + 4].square() / d1[None, i:i + 4].square()
                keep1[:, i:i + 4] = top2_of_4_mask(saliency)
            col = w1[:, i]
            q = col * keep1[:, i]
            e = (col - q) / d1[i]
            w1[:, i:] -= e[:, None] * u1[None, i, i:]
            q1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    return w * mask, mask
