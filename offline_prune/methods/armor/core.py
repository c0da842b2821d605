"""ARMOR's shared core, part 1: the state, the exact group update, the SPD solve and the checked steps that the
optimisers (fast, paper, fast-gram) build their iterations from (loop.py: the stopping rule and the one loop).

An optimiser fits A C B to a target T (the normalised weight, or W with scaled columns) under a weighted loss
L = <R, R H> with R = A C B - T (H: diag h for the NoWag proxy, the full X^T X for fast-gram). It supplies an
``Objective`` (its ``Fit`` of a state and its per-group Gram matrices) and an ``Optimizer`` (its iteration and its
result); this module gives it the rest. Every step here is kept only if L does not rise in floating point.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from vllm_armor.blockdiag import blockdiag_left, blockdiag_right
from vllm_armor.checkpoint_format import GROUP

# The 6 ways to keep 2 of 4.
PATTERNS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
TINY = 1e-30


@dataclass
class State:
    a: torch.Tensor  # (nO, bo, bo)
    b: torch.Tensor  # (nI, bi, bi)
    c: torch.Tensor  # (d_out, d_in), zero outside mask
    mask: torch.Tensor  # (d_out, d_in) bool

    @classmethod
    def identity(cls, core: torch.Tensor, mask: torch.Tensor, bo: int, bi: int) -> State:
        """A = B = I around ``core`` (already zero outside ``mask``)."""
        d_out, d_in = core.shape
        return cls(torch.eye(bo, device=core.device).expand(d_out // bo, -1, -1).clone(),
                   torch.eye(bi, device=core.device).expand(d_in // bi, -1, -1).clone(), core, mask)


@dataclass
class Fit:
    """The residual R = A C B - T of a state, R weighted (R h or R H) and the loss L = <R, R H>."""

    r: torch.Tensor
    rh: torch.Tensor
    loss: float


Solves = tuple[Callable[[Fit], torch.Tensor], ...]  # new (kept values, A, B), each from the current fit


class Objective(Protocol):
    """What an optimiser's loss supplies to the shared steps."""

    def fit(self, s: State) -> Fit: ...

    def group_gram(self, s: State) -> torch.Tensor:
        """M_g = (B H B^T)[g, g] for every group g of 4 inputs: (d_in/4, 4, 4)."""
        ...


def transposed(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.transpose(1, 2)


def residual(s: State, target: torch.Tensor) -> torch.Tensor:
    """R = A C B - target."""
    return blockdiag_right(blockdiag_left(s.a, s.c), s.b) - target


def half_core_grad(s: State, rh: torch.Tensor) -> torch.Tensor:
    """Q = A^T (R H) B^T, dense (d_out, d_in): half the gradient of L w.r.t. the dense core."""
    return blockdiag_right(blockdiag_left(transposed(s.a), rh), transposed(s.b))


# ---------------------------------------------------------------- solves


def solve_groups(
    q: torch.Tensor, c: torch.Tensor, gram: torch.Tensor, n: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best 2:4 re-solve of groups. q, c: (..., 4); gram: (..., 4, 4) broadcastable to them; n: (...).

    With t = M c - q / n the change of L is  dL(v) = n v^T M v - 2 n v.t + n c^T M c - 2 c.q,  so for
    pattern S the optimum is v_S = M_SS^-1 t_S and dL = n c^T M c - 2 c.q - n t_S^T M_SS^-1 t_S.
    Returns (new values (..., 4), new keep mask (..., 4), loss change (...)), exact for each group alone.
    """
    pat = torch.tensor(PATTERNS, device=q.device)  # (6, 2)
    n = n.clamp_min(TINY).unsqueeze(-1)
    mc = (gram * c.unsqueeze(-2)).sum(-1)  # M c
    t = mc - q / n
    t0, t1 = t[..., pat[:, 0]], t[..., pat[:, 1]]  # (..., 6)
    m00, m11 = gram[..., pat[:, 0], pat[:, 0]], gram[..., pat[:, 1], pat[:, 1]]
    m01 = gram[..., pat[:, 0], pat[:, 1]]
    damp = 1e-7 * (m00 + m11) + TINY
    m00, m11 = m00 + damp, m11 + damp
    det = (m00 * m11 - m01 * m01).clamp_min(TINY)
    v0 = (m11 * t0 - m01 * t1) / det
    v1 = (m00 * t1 - m01 * t0) / det
    gain = t0 * v0 + t1 * v1  # t_S^T M_SS^-1 t_S
    best = gain.argmax(dim=-1, keepdim=True)
    change = n.squeeze(-1) * ((c * mc).sum(-1) - gain.gather(-1, best).squeeze(-1)) - 2 * (c * q).sum(-1)
    idx = pat[best.squeeze(-1)]  # (..., 2)
    vals = torch.zeros_like(q).scatter_(-1, idx, torch.cat([v0.gather(-1, best), v1.gather(-1, best)], -1))
    keep = torch.zeros(q.shape, dtype=torch.bool, device=q.device).scatter_(-1, idx, True)
    return vals, keep, change


def spd_solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Batched solve of gram X = rhs for symmetric positive semi-definite gram, with a small ridge."""
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)
    ridge = 1e-6 * diag.mean(-1).clamp_min(TINY)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(gram + ridge[:, None, None] * eye)
    if bool((info != 0).any()):
        return torch.linalg.lstsq(gram + ridge[:, None, None] * eye, rhs).solution
    return torch.cholesky_solve(rhs, factor)


# ---------------------------------------------------------------- checked steps


def try_update(obj: Objective, s: State, fit: Fit, name: str, value: torch.Tensor) -> Fit:
    """Set ``s.<name>`` to ``value`` if that keeps L finite and not higher; the fit of the state kept."""
    old = getattr(s, name)
    setattr(s, name, value)
    new = obj.fit(s)
    if math.isfinite(new.loss) and new.loss <= fit.loss:
        return new
    setattr(s, name, old)
    return fit


def _set_groups(s: State, rows: torch.Tensor, groups: torch.Tensor, vals: torch.Tensor, keep: torch.Tensor) -> None:
    d_out, d_in = s.c.shape
    s.c.view(d_out, d_in // GROUP, GROUP)[rows, groups] = vals * keep
    s.mask.view(d_out, d_in // GROUP, GROUP)[rows, groups] = keep


def try_groups(obj: Objective, s: State, fit: Fit, picked: tuple[torch.Tensor, ...], accept: torch.Tensor,
               strict: bool = False) -> Fit:
    """Apply the accepted group updates ``picked`` = (rows, groups, values (k, 4), keep (k, 4)) together; undo them
    if, in floating point, L went up (``strict``: or stayed)."""
    if not bool(accept.any()):
        return fit
    d_out, d_in = s.c.shape
    rows, groups, vals, keep = (x[accept] for x in picked)
    old_c = s.c.view(d_out, d_in // GROUP, GROUP)[rows, groups]
    old_m = s.mask.view(d_out, d_in // GROUP, GROUP)[rows, groups]
    _set_groups(s, rows, groups, vals, keep)
    new = obj.fit(s)
    if math.isfinite(new.loss) and (new.loss < fit.loss if strict else new.loss <= fit.loss):
        return new
    _set_groups(s, rows, groups, old_c, old_m)
    return fit


def mask_step(obj: Objective, s: State, fit: Fit, share: float, strict: bool = False) -> tuple[Fit, bool]:
    """Exact group update evaluated for every group; the best ``share`` of the improving ones applied together
    (checked by ``try_groups``). Returns the fit and whether L went down."""
    d_out, d_in = s.c.shape
    n_groups = d_in // GROUP
    q = half_core_grad(s, fit.rh).reshape(d_out, n_groups, GROUP)
    c = s.c.reshape(d_out, n_groups, GROUP)
    n = s.a.square().sum(dim=1).reshape(d_out, 1).expand(d_out, n_groups)
    vals, keep, change = solve_groups(q, c, obj.group_gram(s), n)
    change = change.reshape(-1)
    count = int((change < 0).sum())
    if count == 0:
        return fit, False
    pick = torch.topk(change, max(1, int(count * share)), largest=False).indices
    pick = pick[change[pick] < 0]
    picked = (pick // n_groups, pick % n_groups, vals.reshape(-1, GROUP)[pick], keep.reshape(-1, GROUP)[pick])
    new = try_groups(obj, s, fit, picked, torch.ones(pick.shape[0], dtype=torch.bool, device=pick.device), strict)
    return new, new.loss < fit.loss


class BlockSteps:
    """The exact block-coordinate iteration of fast and fast-gram: one mask step, then ``sweeps`` rounds of
    (kept values, A, B), each kept only if L does not rise. ``share`` is the fraction of the improving groups the
    mask step applies together: it shrinks when their interactions made the joint step fail and grows back after
    a success. An optimiser supplies ``solves``: the new kept values, A and B from the current fit;
    ``strict_mask``: a mask step that leaves L equal is undone."""

    strict_mask = False

    def __init__(self, objective: Objective, state: State, sweeps: int, solves: Solves) -> None:
        self.objective, self.state, self.sweeps, self.solves = objective, state, sweeps, solves
        self.share = 1.0

    def start(self) -> Fit:
        return self.objective.fit(self.state)

    def step(self, fit: Fit) -> Fit:
        obj, s = self.objective, self.state
        fit, ok = mask_step(obj, s, fit, self.share, self.strict_mask)
        self.share = min(1.0, self.share * 2) if ok else max(self.share / 4, 1e-4)
        for _ in range(self.sweeps):
            for name, solve in zip(("c", "a", "b"), self.solves, strict=True):
                fit = try_update(obj, s, fit, name, solve(fit))
        return fit
