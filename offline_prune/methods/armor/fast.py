"""ARMOR's ``fast`` optimiser: exact block-coordinate steps on the NoWag proxy (nowag.py), per iteration

  * mask: the exact group update evaluated for every group at once; the best candidates applied together
    (they interact inside a block pair, so the step is checked and the share applied shrinks on failure);
  * values: with A, B and the mask fixed, L is a least-squares problem in the kept values, separable over
    (I, J) block pairs with the normal operator X -> mask * (A^T A X B H B^T); a few conjugate-gradient
    steps per block pair (matrix-free, batched over pairs) from the current values;
  * A: with B, C fixed, A_I = (Wn_I H Y_I^T)(Y_I H Y_I^T)^-1 with Y = C B (rows of block I);
  * B: with A, C fixed, every column of B only moves its own column of A C B, so its weight h_j cancels:
    B_J = (Z_J^T Z_J)^-1 Z_J^T Wn_J with Z = A C (columns of block J);
the last three repeated ``sweeps`` times per mask step (core.BlockSteps). 3 sweeps of 2 CG steps reached paper
mode's 3000-iteration loss soonest on SmolLM2 q_proj.
"""

from __future__ import annotations

import torch

from offline_prune.methods.armor.core import TINY, BlockSteps, Fit, State, half_core_grad, spd_solve, transposed
from offline_prune.methods.armor.loop import ArmorConfig, ArmorResult, Trace
from offline_prune.methods.armor.nowag import ProxyProblem, proxy_start
from vllm_armor.blockdiag import blockdiag_left, blockdiag_right


def solve_a(p: ProxyProblem, s: State) -> torch.Tensor:
    n_o, d_in = s.a.shape[0], s.c.shape[1]
    y = blockdiag_right(s.c, s.b).reshape(n_o, p.bo, d_in)
    yh = y * p.h
    gram = torch.bmm(yh, y.transpose(1, 2))  # Y H Y^T
    rhs = torch.bmm(yh, p.wn.reshape(n_o, p.bo, d_in).transpose(1, 2))  # Y H Wn^T = (Wn H Y^T)^T
    return spd_solve(gram, rhs).transpose(1, 2)


def solve_b(p: ProxyProblem, s: State) -> torch.Tensor:
    d_out, n_i = s.c.shape[0], s.b.shape[0]
    z = blockdiag_left(s.a, s.c).reshape(d_out, n_i, p.bi).transpose(0, 1)  # (nI, d_out, bi)
    wn = p.wn.reshape(d_out, n_i, p.bi).transpose(0, 1)
    return spd_solve(torch.bmm(z.transpose(1, 2), z), torch.bmm(z.transpose(1, 2), wn))


def _block_dot(p: ProxyProblem, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per (I, J) block pair inner products, broadcast back to (d_out, d_in)."""
    d_out, d_in = x.shape
    n_o, n_i = d_out // p.bo, d_in // p.bi
    dots = (x * y).reshape(n_o, p.bo, n_i, p.bi).sum(dim=(1, 3), keepdim=True)
    return dots.expand(n_o, p.bo, n_i, p.bi).reshape(d_out, d_in)


def cg_values(p: ProxyProblem, s: State, fit: Fit, steps: int) -> torch.Tensor:
    """Conjugate gradients on the kept values, independently in every (I, J) block pair, from s.c."""
    ata = torch.bmm(transposed(s.a), s.a)
    bhb = torch.bmm(s.b * p.h.view(s.b.shape[0], 1, p.bi), transposed(s.b))
    x = s.c.clone()
    res = -half_core_grad(s, fit.rh) * s.mask  # rhs - K x
    d = res.clone()
    rr = _block_dot(p, res, res)
    for _ in range(steps):
        kd = blockdiag_left(ata, blockdiag_right(d, bhb)) * s.mask
        dkd = _block_dot(p, d, kd)
        alpha = torch.where(dkd > TINY, rr / dkd.clamp_min(TINY), torch.zeros_like(dkd))
        x += alpha * d
        res -= alpha * kd
        rr_new = _block_dot(p, res, res)
        beta = torch.where(rr > TINY, rr_new / rr.clamp_min(TINY), torch.zeros_like(rr))
        d = res + beta * d
        rr = rr_new
    return x


class FastOptimizer(BlockSteps):
    """``--optimizer fast``: the NoWag-P start, then the block steps above; stops on the plateau rule."""

    name = "fast"
    default_iters = 120  # with the plateau rule (docs/BENCHMARKS.md, "ARMOR convergence")
    patience_rule = False

    def __init__(self, problem: ProxyProblem, state: State, sweeps: int = 3, cg_steps: int = 2) -> None:
        super().__init__(problem, state, sweeps, (lambda fit: cg_values(problem, state, fit, cg_steps),
                                                  lambda fit: solve_a(problem, state),
                                                  lambda fit: solve_b(problem, state)))
        self.problem, self.scale = problem, problem.scale

    @classmethod
    def create(cls, weight: torch.Tensor, h: torch.Tensor, gram: torch.Tensor | None, block_out: int,
               block_in: int, config: ArmorConfig) -> FastOptimizer:
        return cls(*proxy_start(weight, h, block_out, block_in))

    def result(self, trace: Trace, losses: tuple[float, float], reason: str) -> ArmorResult:
        return self.problem.result(self.state, trace, losses, reason)
