"""ARMOR's ``paper`` optimiser (ARMOR, arXiv 2510.05528) on the NoWag proxy (nowag.py), per iteration:

  1. one Adam step (lr 1e-4) on the blocks of A, B and the kept values of C for the relative loss, rejected if it
     raises the loss;
  2. in every (output block, input tile) pair one group, drawn with probability proportional to the L1 norm of
     Q = A^T (R h) B^T over the group, gets the exact update (core.solve_groups), kept if the loss does not rise.

Early stop as in the official code: an iteration "improves" when the relative loss drops by more than 1e-6
relatively and 1e-8 absolutely; stop after ``patience`` iterations without improvement (loop.Stopper).
"""

from __future__ import annotations

import torch

from offline_prune.methods.armor.core import TINY, Fit, State, half_core_grad, solve_groups, try_groups
from offline_prune.methods.armor.loop import ArmorConfig, ArmorResult, Trace
from offline_prune.methods.armor.nowag import ProxyProblem, group_gram, proxy_start, tile
from vllm_armor.blockdiag import blockdiag_left, blockdiag_right
from vllm_armor.checkpoint_format import GROUP


def sample_groups(p: ProxyProblem, q: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One group per (output block, input tile), drawn with probability ~ L1 norm of Q over the group."""
    d_out, d_in = q.shape
    bo, bt = p.bo, tile(p.bi)
    n_o, n_t, g = d_out // bo, d_in // bt, bt // GROUP
    score = q.abs().reshape(d_out, d_in // GROUP, GROUP).sum(-1)  # (d_out, d_in/4)
    score = score.reshape(n_o, bo, n_t, g).permute(0, 2, 1, 3).reshape(n_o * n_t, bo * g)
    score = torch.nan_to_num(score, nan=0.0) + TINY
    pick = torch.multinomial(score.cpu(), 1, generator=gen).squeeze(1).to(q.device)
    pair = torch.arange(n_o * n_t, device=q.device)
    rows = (pair // n_t) * bo + pick // g
    groups = (pair % n_t) * g + pick % g
    return rows, groups


def adam_grads(p: ProxyProblem, s: State, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the relative loss w.r.t. the blocks of A, B and the kept values of C."""
    (d_out, d_in), n_o, n_i = s.c.shape, s.a.shape[0], s.b.shape[0]
    g = r * (2.0 * p.h / p.scale)
    cb = blockdiag_right(s.c, s.b)
    ac = blockdiag_left(s.a, s.c)
    ga = torch.bmm(g.reshape(n_o, p.bo, d_in), cb.reshape(n_o, p.bo, d_in).transpose(1, 2))
    gb = torch.bmm(ac.reshape(d_out, n_i, p.bi).permute(1, 2, 0), g.reshape(d_out, n_i, p.bi).transpose(0, 1))
    gc = half_core_grad(s, g) * s.mask
    return ga, gb, gc


class PaperOptimizer:
    """``--optimizer paper``: the NoWag-P start, then an Adam step and sampled group updates per iteration."""

    name = "paper"
    default_iters = 20000  # the paper's setting, with the patience rule
    patience_rule = True

    def __init__(self, problem: ProxyProblem, state: State, lr: float, seed: int) -> None:
        self.problem, self.state = problem, state
        self.scale = problem.scale
        self.gen = torch.Generator().manual_seed(seed)
        self.adam = torch.optim.Adam([state.a, state.b, state.c], lr=lr)

    @classmethod
    def create(cls, weight: torch.Tensor, h: torch.Tensor, gram: torch.Tensor | None, block_out: int,
               block_in: int, config: ArmorConfig) -> PaperOptimizer:
        return cls(*proxy_start(weight, h, block_out, block_in), config.lr, config.seed)

    def start(self) -> Fit:
        return self.problem.fit(self.state)

    def adam_step(self, fit: Fit) -> Fit:
        """One Adam step on A, B and the kept values; undone if it raises the loss."""
        p, s = self.problem, self.state
        saved = (s.a.clone(), s.b.clone(), s.c.clone())
        s.a.grad, s.b.grad, s.c.grad = adam_grads(p, s, fit.r)
        self.adam.step()
        s.c.mul_(s.mask)
        new = p.fit(s)
        if new.loss <= fit.loss:
            return new
        s.a.copy_(saved[0])
        s.b.copy_(saved[1])
        s.c.copy_(saved[2])
        return fit

    def step(self, fit: Fit) -> Fit:
        p, s = self.problem, self.state
        fit = self.adam_step(fit)
        q_full = half_core_grad(s, fit.rh)
        rows, groups = sample_groups(p, q_full, self.gen)
        d_out, d_in = s.c.shape
        q = q_full.reshape(d_out, d_in // GROUP, GROUP)[rows, groups]
        c = s.c.reshape(d_out, d_in // GROUP, GROUP)[rows, groups]
        n = s.a.square().sum(dim=1).reshape(-1)[rows]
        vals, keep, change = solve_groups(q, c, group_gram(s.b, p.h)[groups], n)
        return try_groups(p, s, fit, (rows, groups, vals, keep), change < 0)

    def result(self, trace: Trace, losses: tuple[float, float], reason: str) -> ArmorResult:
        return self.problem.result(self.state, trace, losses, reason)
