"""ARMOR's ``fast-gram`` optimiser: fast mode's exact block-coordinate steps on the full layer objective.

    L(A, B, C) = tr((A C B - W) H (A C B - W)^T),    H = X^T X (full),   relative: L / tr(W H W^T),

i.e. ||(W_hat - W) X^T||_F^2, SparseGPT's objective, instead of the NoWag proxy (diagonal h, normalised W).
Start: SparseGPT's 2:4 mask and values (A = B = I), so the result is never worse than SparseGPT on L. Like
SparseGPT it is sequential: its statistics come from the already-pruned earlier layers.

Column scaling is exact here: with D = diag(sqrt(diag H)), fitting W D under D^-1 H D^-1 (unit diagonal, better
conditioned) gives the same L; B is mapped back on return (B D^-1). Rows are not normalised
(a row scaling would re-weight the rows of L).

Write R = A C B - W, Q = A^T (R H) B^T, G = B H B^T. Every step of the fast optimiser keeps its form:
  * mask: for one group (row p, inputs g) dL(D) = 2 D.q + n_p D^T G[g, g] D with q = Q[p, g],
    n_p = ||A[:, p]||^2 (the same 6-pattern solve); with a full H all groups of an output block interact,
    so the best share of the improving groups is applied together and the share adapts (core.BlockSteps);
  * values: least squares in the kept values with the operator X -> mask * (A^T A X G), independent per
    output block: a few Jacobi-preconditioned CG steps per output block (batched);
  * A: A_I = (W_I H Y_I^T)(Y_I H Y_I^T)^-1, Y = C B (exact, rows of different blocks are independent);
  * B: the blocks are coupled through H; with Z = A C the normal equations are bd(Z^T Z B H) = bd(Z^T W H)
    (bd: the block-diagonal part), solved by a few CG steps over all blocks of B at once, preconditioned by
    the block-Jacobi operator B_J -> (Z^T Z)_JJ B_J H_JJ (inverted by two small solves).
Every step is kept only if it lowers L in floating point, so the history never rises; no randomness.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offline_prune.methods.armor.core import (
    TINY,
    BlockSteps,
    Fit,
    State,
    half_core_grad,
    residual,
    spd_solve,
    transposed,
)
from offline_prune.methods.armor.loop import ArmorConfig, ArmorResult, Trace
from offline_prune.methods.sparsegpt import sparsegpt_2of4
from offline_prune.proxy import clean_h, normalize, nowag_p_mask
from vllm_armor.blockdiag import blockdiag_left, blockdiag_right
from vllm_armor.checkpoint_format import GROUP


@dataclass
class FullProblem:
    w: torch.Tensor  # (d_out, d_in) W D (columns scaled by d)
    hm: torch.Tensor  # (d_in, d_in) D^-1 H D^-1
    wh: torch.Tensor  # w @ hm (constant)
    scale: float  # tr(W H W^T)
    bo: int
    bi: int

    def fit(self, s: State) -> Fit:
        r = residual(s, self.w)
        rh = r @ self.hm
        return Fit(r, rh, float((r * rh).sum()))

    def bhb(self, b: torch.Tensor) -> torch.Tensor:
        """G = B H B^T (dense d_in x d_in)."""
        return blockdiag_right(blockdiag_left(b, self.hm), transposed(b))

    def group_gram(self, s: State) -> torch.Tensor:
        """G[g, g] for every group of 4 inputs: (d_in/4, 4, 4)."""
        g = self.bhb(s.b)
        n = g.shape[0] // GROUP
        return torch.diagonal(g.reshape(n, GROUP, n, GROUP), dim1=0, dim2=2).permute(2, 0, 1)


def make_problem(weight: torch.Tensor, gram: torch.Tensor, bo: int, bi: int) -> tuple[FullProblem, torch.Tensor]:
    """The scaled problem and the column scales d = sqrt(diag H) (dead inputs get a tiny positive scale)."""
    h = 0.5 * (gram.float() + gram.float().T)
    diag = h.diagonal().clone()
    bad = ~torch.isfinite(diag) | (diag <= 0)
    if bool(bad.any()):
        good = diag[~bad]
        fill = float(good.mean()) * 1e-6 if good.numel() else 1.0
        h[bad, :] = 0.0
        h[:, bad] = 0.0
        h[bad, bad] = fill
        diag[bad] = fill
    d = diag.sqrt()
    hm = h / d[:, None] / d[None, :]
    w = weight.float() * d[None, :]
    wh = w @ hm
    return FullProblem(w, hm, wh, float((wh * w).sum()), bo, bi), d


def start_state(p: FullProblem, weight: torch.Tensor, gram: torch.Tensor, d: torch.Tensor, start: str) -> State:
    """A = B = I and the core of the start: SparseGPT's mask and values, or NoWag-P's mask on W."""
    if start == "sparsegpt":
        core, mask = sparsegpt_2of4(weight.float(), gram.float())
        c = core * d[None, :]
    elif start == "nowag-p":
        norm = normalize(weight.float())
        mask = nowag_p_mask(norm.weight, clean_h(gram.diagonal()))
        c = p.w * mask
    else:
        raise ValueError(f"armor fast-gram: start must be 'sparsegpt' or 'nowag-p', got {start!r}")
    return State.identity(c * mask, mask, p.bo, p.bi)


def _row_block_dot(bo: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Inner products per output block (bo rows), broadcast back to x's shape."""
    d_out, d_in = x.shape
    dots = (x * y).reshape(d_out // bo, bo * d_in).sum(1)
    return dots.repeat_interleave(bo).unsqueeze(1)


def cg_values(p: FullProblem, s: State, f: Fit, steps: int) -> torch.Tensor:
    """Jacobi-preconditioned CG on the kept values, independently per output block, from s.c."""
    ata = torch.bmm(transposed(s.a), s.a)
    g = p.bhb(s.b)
    precond = torch.diagonal(ata, dim1=1, dim2=2).reshape(-1, 1) * g.diagonal().reshape(1, -1)
    inv = torch.where(s.mask, 1.0 / precond.clamp_min(TINY), torch.zeros_like(precond))
    x = s.c.clone()
    res = -half_core_grad(s, f.rh) * s.mask
    z = res * inv
    d = z.clone()
    rz = _row_block_dot(p.bo, res, z)
    for _ in range(steps):
        kd = blockdiag_left(ata, d @ g) * s.mask
        dkd = _row_block_dot(p.bo, d, kd)
        alpha = torch.where(dkd > TINY, rz / dkd.clamp_min(TINY), torch.zeros_like(dkd))
        x += alpha * d
        res -= alpha * kd
        z = res * inv
        rz_new = _row_block_dot(p.bo, res, z)
        beta = torch.where(rz > TINY, rz_new / rz.clamp_min(TINY), torch.zeros_like(rz))
        d = z + beta * d
        rz = rz_new
    return x


def solve_a(p: FullProblem, s: State) -> torch.Tensor:
    n_o, d_in = s.a.shape[0], s.c.shape[1]
    y = blockdiag_right(s.c, s.b)
    yh = (y @ p.hm).reshape(n_o, p.bo, d_in)
    gram = torch.bmm(yh, y.reshape(n_o, p.bo, d_in).transpose(1, 2))  # Y_I H Y_I^T
    rhs = torch.bmm(yh, p.w.reshape(n_o, p.bo, d_in).transpose(1, 2))  # Y_I H W_I^T
    return spd_solve(gram, rhs).transpose(1, 2)


def _bd(x: torch.Tensor, bi: int) -> torch.Tensor:
    """Diagonal (bi x bi) blocks of a square matrix: (n, bi, bi)."""
    n = x.shape[0] // bi
    return torch.diagonal(x.reshape(n, bi, n, bi), dim1=0, dim2=2).permute(2, 0, 1)


def _bd_product(left: torch.Tensor, right: torch.Tensor, bi: int) -> torch.Tensor:
    """bd(left @ right) without forming the product: (n, bi, bi)."""
    n = left.shape[0] // bi
    return torch.bmm(left.reshape(n, bi, -1), right.reshape(-1, n, bi).transpose(0, 1))


def _ridged_cholesky(x: torch.Tensor) -> torch.Tensor:
    diag = torch.diagonal(x, dim1=-2, dim2=-1)
    ridge = 1e-6 * diag.mean(-1).clamp_min(TINY) + TINY
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    factor, info = torch.linalg.cholesky_ex(x + ridge[:, None, None] * eye)
    if bool((info != 0).any()):
        factor = torch.linalg.cholesky(x + (ridge[:, None, None] * 1e3 + diag.abs().mean(-1)[:, None, None]
                                            * 1e-3) * eye)
    return factor


def cg_b(p: FullProblem, s: State, steps: int) -> torch.Tensor:
    """A few block-Jacobi-preconditioned CG steps on bd(Z^T Z B H) = bd(Z^T W H) over all blocks of B."""
    bi = p.bi
    z = blockdiag_left(s.a, s.c)
    ztz = z.T @ z
    rhs = _bd_product(z.T.contiguous(), p.wh, bi)
    lz, lh = _ridged_cholesky(_bd(ztz, bi)), _ridged_cholesky(_bd(p.hm, bi))

    def op(x: torch.Tensor) -> torch.Tensor:
        return _bd_product(ztz, blockdiag_left(x, p.hm), bi)

    def prec(x: torch.Tensor) -> torch.Tensor:  # (Z^T Z)_JJ^-1 x H_JJ^-1
        y = torch.cholesky_solve(x, lz)
        return torch.cholesky_solve(transposed(y), lh).transpose(1, 2)

    x = s.b.clone()
    res = rhs - op(x)
    zr = prec(res)
    d = zr.clone()
    rz = float((res * zr).sum())
    for _ in range(steps):
        kd = op(d)
        dkd = float((d * kd).sum())
        if not dkd > TINY:
            break
        alpha = rz / dkd
        x += alpha * d
        res -= alpha * kd
        zr = prec(res)
        rz_new = float((res * zr).sum())
        d = zr + (rz_new / rz if rz > TINY else 0.0) * d
        rz = rz_new
    return x


class GramOptimizer(BlockSteps):
    """``--optimizer fast-gram``: SparseGPT's start, then one mask step and ``sweeps`` rounds of (values by CG,
    A, B by CG) per iteration; a mask step that leaves L equal is undone; stops on the plateau rule."""

    name = "fast-gram"
    default_iters = 60  # with the plateau rule (not measured separately)
    patience_rule = False
    strict_mask = True

    def __init__(self, problem: FullProblem, state: State, d: torch.Tensor, sweeps: int = 3, cg_steps: int = 3,
                 b_steps: int = 4) -> None:
        super().__init__(problem, state, sweeps, (lambda fit: cg_values(problem, state, fit, cg_steps),
                                                  lambda fit: solve_a(problem, state),
                                                  lambda fit: cg_b(problem, state, b_steps)))
        self.problem, self.d = problem, d
        self.scale = max(problem.scale, TINY)

    @classmethod
    def create(cls, weight: torch.Tensor, h: torch.Tensor, gram: torch.Tensor | None, block_out: int,
               block_in: int, config: ArmorConfig) -> GramOptimizer:
        d_in = weight.shape[1]
        if gram is None or tuple(gram.shape) != (d_in, d_in):
            raise ValueError(f"armor_prune fast-gram: needs gram = X^T X of shape ({d_in}, {d_in}), got "
                             f"{None if gram is None else tuple(gram.shape)}")
        p, d = make_problem(weight, gram, block_out, block_in)
        return cls(p, start_state(p, weight, gram, d, config.gram_start), d)

    def result(self, trace: Trace, losses: tuple[float, float], reason: str) -> ArmorResult:
        b = self.state.b / self.d.view(-1, 1, self.problem.bi)  # undo the column scaling: W_hat = A C (B D^-1)
        return trace.result(self.state.a, b, self.state, losses, reason)
