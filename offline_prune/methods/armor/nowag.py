"""The loss that ARMOR's fast and paper optimisers fit: the NoWag proxy in the normalised space.

W = diag(r) Wn diag(c) (offline_prune.proxy.normalize) and

    L(A, B, C) = sum_ij h_j (A C B - Wn)_ij^2,        relative: L / sum_ij h_j Wn_ij^2,

with h = diag(X^T X) (divided by its mean for conditioning; relative losses are unchanged). Start: A = B = I and
C = Wn * M, M the NoWag-P mask, so the initial loss is NoWag-P's. On return the normaliser is folded in:
A'_I = diag(r_I) A_I, B'_J = B_J diag(c_J), so that A' C B' ~ W.

Exact group update. Changing the 4 values of one group (row p, inputs g) by D changes L by
    dL(D) = 2 D.q + n_p D^T M_g D,     q = Q[p, g],  n_p = ||A[:, p]||^2,  M_g = (B diag(h) B^T)[g, g],
exactly (core.solve_groups). Groups in different (output block, input tile) pairs change disjoint blocks of
A C B; input tiles have lcm(bi, 4) columns so that a group never straddles two tiles (bi = 1, 2 or odd sizes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from offline_prune.methods.armor.core import Fit, State, residual, transposed
from offline_prune.methods.armor.loop import ArmorResult, Trace
from offline_prune.proxy import Normalized, clean_h, normalize, nowag_p_mask, proxy_scale
from vllm_armor.checkpoint_format import GROUP


def tile(bi: int) -> int:
    """Columns of an input tile: lcm(bi, 4)."""
    return bi * GROUP // math.gcd(bi, GROUP)


def group_gram(b: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """M_g = (B diag(h) B^T)[g, g] for every group g of 4 inputs: (d_in/4, 4, 4)."""
    n_in, bi, _ = b.shape
    bhb = torch.bmm(b * h.view(n_in, 1, bi), transposed(b))  # blocks of B H B^T
    bt = tile(bi)
    k, n_t = bt // bi, n_in * bi // bt
    if k > 1:  # embed the k blocks of a tile in one (bt x bt) block-diagonal matrix
        eye = torch.eye(k, dtype=b.dtype, device=b.device)
        bhb = torch.einsum("tkab,kl->tkalb", bhb.reshape(n_t, k, bi, bi), eye).reshape(n_t, bt, bt)
    g = bt // GROUP
    diag = torch.diagonal(bhb.reshape(n_t, g, GROUP, g, GROUP), dim1=1, dim2=3)  # (n_t, 4, 4, g)
    return diag.permute(0, 3, 1, 2).reshape(n_t * g, GROUP, GROUP)


@dataclass
class ProxyProblem:
    wn: torch.Tensor  # (d_out, d_in) normalised weight
    h: torch.Tensor  # (d_in,) h / mean(h), for conditioning; relative losses are unchanged
    scale: float  # sum h Wn^2 with this h
    bo: int
    bi: int
    norm: Normalized  # the normaliser, folded into A and B on return
    h_mean: float  # mean of the cleaned h: absolute losses are L * h_mean

    def fit(self, s: State) -> Fit:
        r = residual(s, self.wn)
        return Fit(r, r * self.h, float((r.square() * self.h).sum()))

    def group_gram(self, s: State) -> torch.Tensor:
        return group_gram(s.b, self.h)

    def result(self, s: State, trace: Trace, losses: tuple[float, float], reason: str) -> ArmorResult:
        """The state as a result (copies), with the normaliser folded into A and B."""
        a = s.a * self.norm.row_scale.view(-1, self.bo, 1)
        b = s.b * self.norm.col_scale.view(-1, 1, self.bi)
        return trace.result(a, b, s, (losses[0] * self.h_mean, losses[1] * self.h_mean), reason)


def proxy_start(weight: torch.Tensor, h: torch.Tensor, bo: int, bi: int) -> tuple[ProxyProblem, State]:
    """The problem of ``weight`` (any float dtype, on the device) and its NoWag-P start with A = B = I."""
    norm = normalize(weight)
    h = clean_h(h)
    h_mean = float(h.mean())
    hn = h / h_mean
    p = ProxyProblem(norm.weight, hn, float(proxy_scale(norm.weight, hn)), bo, bi, norm, h_mean)
    mask = nowag_p_mask(p.wn, p.h)
    return p, State.identity(p.wn * mask, mask, bo, bi)
