"""SparseGPT 2:4 (Frantar & Alistarh 2023) of one linear layer.

Minimise ||X W^T - X W_hat^T||_F^2 row by row with OBS updates. With U the upper Cholesky factor of H^-1
(H^-1 = U^T U), d_j = U_jj, columns are visited left to right; at the first column of every group of 4 the
mask of that group is chosen by the OBS saliency w_ij^2 / d_j^2 (the 2 largest are kept; the saliencies use the
weights already updated by the pruning of earlier columns). Pruning column j (w = W[:, j], q = w on the mask, 0
elsewhere) costs (w - q)^2 / d_j^2 and is compensated exactly in the columns not yet visited by

    W[:, j:] -= ((w - q) / d_j) U[j, j:].

The update is applied eagerly inside a block of ``blocksize`` columns and lazily, once per block, to the
columns after it (one matmul with the block's errors), which gives the same result.

Sequential, as in the paper: H comes from the model whose earlier layers are already pruned. Conventions of
the baselines: offline_prune.methods._inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from offline_prune.methods import PruneOutput, PruningMethod
from offline_prune.methods._inputs import Result, check_weight
from offline_prune.proxy import top2_of_4_mask
from offline_prune.statistics import InputStats

log = logging.getLogger(__name__)


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
    w = check_weight(weight).clone()
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


def _prune(weight: torch.Tensor, stats: InputStats | None, h: torch.Tensor, options: Mapping[str, Any], seed: int,
           device: str) -> PruneOutput:
    return PruneOutput(*sparsegpt_2of4(weight, stats.gram.to(device)))


METHOD = PruningMethod(name="sparsegpt", prune=_prune, order=30, sequential=True, needs_gram=True)
