"""ARMOR: a 2:4 sparse core between two block-diagonal matrices, fitted to one weight matrix.

W (d_out x d_in) is approximated by  W_hat = A (C) B,  with A = blockdiag(A_1..A_nO) (blocks bo x bo),
B = blockdiag(B_1..B_nI) (blocks bi x bi) and C a 2:4 sparse core (2 of every 4 consecutive inputs kept).
Everything is fitted in the NoWag-normalised space (offline_prune.proxy): W = diag(r) Wn diag(c), and

    L(A, B, C) = sum_ij h_j (A C B - Wn)_ij^2,        relative: L / sum_ij h_j Wn_ij^2,

with h = diag(X^T X) of the calibration inputs. Init: A = B = I, C = Wn * M, M the NoWag-P mask, so the
initial loss is NoWag-P's. On return the normaliser is folded in: A'_I = diag(r_I) A_I, B'_J = B_J diag(c_J),
so that A' C B' ~ W.

Write R = A C B - Wn and Q = A^T (R * h) B^T (half the gradient of L w.r.t. the dense core).

Exact group update. Changing the 4 values of one group (row p, inputs g) by D changes L by
    dL(D) = 2 D.q + n_p D^T M_g D,     q = Q[p, g],  n_p = ||A[:, p]||^2,  M_g = (B diag(h) B^T)[g, g],
exactly (the change of A C B is the rank-one A[:, p] (D^T B[g, :])). For each of the 6 patterns S the
optimal kept values solve the 2x2 system  M_SS v_S = (M_g c)_S - q_S / n_p  (c the current values); the
best pattern wins and is kept only if dL < 0. The current pattern with its current values is one of the
candidates, so the update never raises L. Groups in different (output block, input tile) pairs change
disjoint blocks of A C B, so one update per pair is exact simultaneously. Input tiles have lcm(bi, 4)
columns so that a group never straddles two tiles (bi = 1, 2 or odd block sizes).

Paper mode (ARMOR, arXiv 2510.05528), per iteration: one Adam step (lr 1e-4) on the blocks of A, B and the
kept values of C for the relative loss; then in every (output block, input tile) pair one group, drawn with
probability proportional to the L1 norm of Q over the group, gets the exact update. Early stop as in the
official code: an iteration "improves" when the relative loss drops by more than 1e-6 relatively and 1e-8
absolutely; stop after `patience` iterations without improvement.

Fast mode, per iteration, exact block-coordinate steps on the same L:
  * mask: the exact update is evaluated for every group at once; the best candidates are applied together
    (they interact inside a block pair, so the step is checked and the share applied halves on failure);
  * values: with A, B and the mask fixed, L is a least-squares problem in the kept values, separable over
    (I, J) block pairs with the normal operator X -> mask * (A^T A X B H B^T); a few conjugate-gradient
    steps per block pair (matrix-free, batched over pairs) from the current values;
the last three repeated a few times per mask step.
  * A: with B, C fixed, A_I = (Wn_I H Y_I^T)(Y_I H Y_I^T)^-1 with Y = C B (rows of block I);
  * B: with A, C fixed, every column of B only moves its own column of A C B, so its weight h_j cancels:
    B_J = (Z_J^T Z_J)^-1 Z_J^T Wn_J with Z = A C (columns of block J).

Fast-gram mode (``--optimizer fast-gram``, offline_prune.methods._armor_full): the same exact block steps on
the full layer objective ||(A C B - W) X^T||_F^2 (H = X^T X instead of diag h, no NoWag normalisation, W not
normalised) from SparseGPT's mask and values, so it is never worse than SparseGPT on that objective; the B solve
becomes block-Jacobi-preconditioned CG over all blocks (H couples them). Like SparseGPT it is sequential: its
statistics come from the already-pruned earlier layers. Its history is the relative layer objective, not the
proxy.

Guarantee (Theorem 3.1 of the paper, enforced here): every step (Adam, group update or block solve) that
would raise L in floating point is rejected, so the history never rises and the returned loss is at most
NoWag-P's (fast-gram: SparseGPT's). Same seed, same device: same result. All math is float32 whatever the
input dtype; every block is handled by batched tensor ops.

Registry entry (offline_prune.methods): options block_size (``auto``: per matrix the largest block whose A and B
hold at most max_overhead x the core's kept values, `auto_block_sizes`; N: per dimension
``largest_block_size(dim, N)``), max_overhead, ab_dtype (how the checkpoint stores A and B), optimizer and
iters; the per-matrix seed is offline_prune.jobs.job_seed. ``--optimizer auto`` (the default, ``chosen_optimizer``)
runs fast-gram under a small A+B budget (below AUTO_GRAM_BELOW) and fast otherwise. With fast-gram the entry asks
the walk for X^T X and sequential statistics (its ``needs_gram``/``sequential`` are functions of the options).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from offline_prune.methods import TIME_LIMIT, MethodOption, PruneOutput, PruningMethod
from offline_prune.models import UserError
from offline_prune.proxy import clean_h, normalize, nowag_p_mask, proxy_scale
from offline_prune.statistics import InputStats
from vllm_armor.blockdiag import blockdiag_left, blockdiag_right
from vllm_armor.checkpoint_format import GROUP

log = logging.getLogger(__name__)

OPTIMIZERS = ("fast", "paper", "fast-gram")
GRAM_OPTIMIZERS = ("fast-gram",)  # on the full X^T X (offline_prune.methods._armor_full)
# --optimizer auto (the default): fast-gram when --block-size auto gives A and B less than this budget, else fast.
# Measured on SmolLM2 (docs/BENCHMARKS.md, overhead sweep): at 0.03 fast was worse than SparseGPT 2:4 (1.40x its
# WikiText-2 perplexity) and fast-gram better (0.79x); at 0.125 fast was the better of the two on the held-out text.
AUTO_GRAM_BELOW = 0.1
# Default --tune-epochs for ARMOR: passes of block-wise reconstruction of A, B and the kept values after the jobs
# (offline_prune.reconstruct). Measured on SmolLM2 in docs/BENCHMARKS.md (block tuning).
TUNE_EPOCHS = 1.0
# The 6 ways to keep 2 of 4.
PATTERNS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
RTOL, ATOL = 1e-6, 1e-8  # early-stop rule of the official code
TINY = 1e-30
AUTO = "auto"
AB_DTYPES = ("model", "float32")  # how A and B are stored: in the model dtype, or float32


def largest_block_size(dim: int, requested: int) -> int:
    """Largest divisor of ``dim`` that is a multiple of 4 and at most ``requested``.

    The rule the pruner uses when ``requested`` does not divide a dimension (SmolLM2: 576 with 128 -> 96).
    """
    if requested < 1:
        raise UserError(f"--block-size must be positive, got {requested}")
    for size in range(min(requested, dim), 0, -1):
        if dim % size == 0 and size % GROUP == 0:
            return size
    raise UserError(f"dimension {dim} has no divisor that is a multiple of 4 and <= --block-size {requested}")


def ab_overhead(d_out: int, d_in: int, block_out: int, block_in: int) -> float:
    """A+B parameters per kept value of the 2:4 core: (d_out bo + d_in bi) / (d_out d_in / 2)."""
    return (d_out * block_out + d_in * block_in) / (d_out * d_in / 2)


def _fit(dim: int, size: int) -> int:
    """Largest divisor of ``dim`` <= ``size``, a multiple of 4 when one exists (4 and up), else any divisor."""
    for cand in range(min(size, dim), 0, -1):
        if dim % cand == 0 and (cand % GROUP == 0 or cand < GROUP):
            return cand
    return 1


def auto_block_sizes(d_out: int, d_in: int, max_overhead: float) -> tuple[int, int]:
    """(block_out, block_in) of ``--block-size auto``: the largest size b (per dimension the largest divisor
    <= b, a multiple of 4 from 4 up) whose A and B hold at most ``max_overhead`` x the core's kept values.

    SmolLM2 at 0.125: 576x576 -> 16, 1536x576 and 576x1536 -> 24, 192x576 -> 8; Llama-2-7B 4096x4096 -> 128.
    """
    if not max_overhead > 0:
        raise UserError(f"--max-overhead must be positive, got {max_overhead}")
    for size in range(max(d_out, d_in), 0, -1):
        bo, bi = _fit(d_out, size), _fit(d_in, size)
        if ab_overhead(d_out, d_in, bo, bi) <= max_overhead:
            return bo, bi
    raise UserError(f"--max-overhead {max_overhead}: even diagonal A and B ({ab_overhead(d_out, d_in, 1, 1):.4f} "
                    f"of the core) exceed it for a {d_out}x{d_in} matrix")


def chosen_optimizer(options: Mapping[str, Any]) -> str:
    """The optimiser a run uses: ``--optimizer`` itself, or for ``auto`` fast-gram under a small A+B budget
    (``--block-size auto`` with ``--max-overhead`` < AUTO_GRAM_BELOW), where starting from SparseGPT pays, else fast."""
    optimizer = options.get("optimizer", AUTO)
    if optimizer != AUTO:
        return optimizer
    small = options.get("block_size", AUTO) == AUTO and options.get("max_overhead", 0.125) < AUTO_GRAM_BELOW
    return "fast-gram" if small else "fast"


def block_sizes(d_out: int, d_in: int, options: Mapping[str, Any]) -> tuple[int, int]:
    """The block sizes of one matrix under the options: ``auto`` (budget rule) or a forced size."""
    if options["block_size"] == AUTO:
        return auto_block_sizes(d_out, d_in, options["max_overhead"])
    return largest_block_size(d_out, options["block_size"]), largest_block_size(d_in, options["block_size"])


def block_size_arg(text: str) -> int | str:
    """``--block-size``: ``auto`` or a positive integer (argparse reports the error as one line)."""
    if str(text).strip().lower() == AUTO:
        return AUTO
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an integer, got {text!r}") from None


@dataclass
class ArmorResult:
    a_blocks: torch.Tensor  # (d_out//block_out, block_out, block_out) float32, normaliser folded in
    b_blocks: torch.Tensor  # (d_in//block_in, block_in, block_in) float32, normaliser folded in
    core: torch.Tensor  # (d_out, d_in) float32, zero outside mask (A' core B' ~ W)
    mask: torch.Tensor  # (d_out, d_in) bool, 2:4
    history: list[float]  # relative proxy loss per iteration, history[0] = NoWag-P init
    init_loss: float  # normalised-space proxy loss at init (absolute)
    final_loss: float
    init_relative: float
    final_relative: float
    iterations: int
    seconds: float
    elapsed: list[float] = field(default_factory=list)  # seconds since start at each history entry
    stopped: str = "cap"  # why the iterations ended: cap, plateau (fast), patience (paper), time_limit
    snapshots: list[ArmorResult] = field(default_factory=list)  # one per ``snapshots`` rule of armor_prune


@dataclass
class _Problem:
    wn: torch.Tensor  # (d_out, d_in) normalised weight
    h: torch.Tensor  # (d_in,) h / mean(h), for conditioning; relative losses are unchanged
    scale: float  # sum h Wn^2 with this h
    bo: int
    bi: int


@dataclass
class _State:
    a: torch.Tensor  # (nO, bo, bo)
    b: torch.Tensor  # (nI, bi, bi)
    c: torch.Tensor  # (d_out, d_in), zero outside mask
    mask: torch.Tensor  # (d_out, d_in) bool

    def copy(self) -> _State:
        return _State(self.a.clone(), self.b.clone(), self.c.clone(), self.mask.clone())


# ---------------------------------------------------------------- block-diagonal products (vllm_armor.blockdiag)


def _t(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.transpose(1, 2)


def _residual(p: _Problem, s: _State) -> torch.Tensor:
    return blockdiag_right(blockdiag_left(s.a, s.c), s.b) - p.wn


def _loss(p: _Problem, r: torch.Tensor) -> float:
    return float((r.square() * p.h).sum())


def _half_core_grad(s: _State, rh: torch.Tensor) -> torch.Tensor:
    """Q = A^T (R h) B^T, dense (d_out, d_in)."""
    return blockdiag_right(blockdiag_left(_t(s.a), rh), _t(s.b))


# ---------------------------------------------------------------- exact group update


def _tile(bi: int) -> int:
    return bi * GROUP // math.gcd(bi, GROUP)


def _group_gram(b: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """M_g = (B diag(h) B^T)[g, g] for every group g of 4 inputs: (d_in/4, 4, 4)."""
    n_in, bi, _ = b.shape
    bhb = torch.bmm(b * h.view(n_in, 1, bi), _t(b))  # blocks of B H B^T
    bt = _tile(bi)
    k, n_t = bt // bi, n_in * bi // bt
    if k > 1:  # embed the k blocks of a tile in one (bt x bt) block-diagonal matrix
        eye = torch.eye(k, dtype=b.dtype, device=b.device)
        bhb = torch.einsum("tkab,kl->tkalb", bhb.reshape(n_t, k, bi, bi), eye).reshape(n_t, bt, bt)
    g = bt // GROUP
    diag = torch.diagonal(bhb.reshape(n_t, g, GROUP, g, GROUP), dim1=1, dim2=3)  # (n_t, 4, 4, g)
    return diag.permute(0, 3, 1, 2).reshape(n_t * g, GROUP, GROUP)


def _solve_groups(
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


def _group_inputs(p: _Problem, s: _State, q_full: torch.Tensor, rows: torch.Tensor, groups: torch.Tensor):
    d_out, d_in = s.c.shape
    q = q_full.reshape(d_out, d_in // GROUP, GROUP)[rows, groups]
    c = s.c.reshape(d_out, d_in // GROUP, GROUP)[rows, groups]
    gram = _group_gram(s.b, p.h)[groups]
    n = s.a.square().sum(dim=1).reshape(-1)[rows]
    return q, c, gram, n


def _apply_groups(s: _State, rows: torch.Tensor, groups: torch.Tensor, vals: torch.Tensor,
                  keep: torch.Tensor) -> None:
    d_out, d_in = s.c.shape
    s.c.view(d_out, d_in // GROUP, GROUP)[rows, groups] = vals * keep
    s.mask.view(d_out, d_in // GROUP, GROUP)[rows, groups] = keep


# ---------------------------------------------------------------- paper mode


def _sample_groups(p: _Problem, q: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One group per (output block, input tile), drawn with probability ~ L1 norm of Q over the group."""
    d_out, d_in = q.shape
    bo, bt = p.bo, _tile(p.bi)
    n_o, n_t, g = d_out // bo, d_in // bt, bt // GROUP
    score = q.abs().reshape(d_out, d_in // GROUP, GROUP).sum(-1)  # (d_out, d_in/4)
    score = score.reshape(n_o, bo, n_t, g).permute(0, 2, 1, 3).reshape(n_o * n_t, bo * g)
    score = torch.nan_to_num(score, nan=0.0) + TINY
    pick = torch.multinomial(score.cpu(), 1, generator=gen).squeeze(1).to(q.device)
    pair = torch.arange(n_o * n_t, device=q.device)
    rows = (pair // n_t) * bo + pick // g
    groups = (pair % n_t) * g + pick % g
    return rows, groups


def _adam_grads(p: _Problem, s: _State, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the relative loss w.r.t. the blocks of A, B and the kept values of C."""
    (d_out, d_in), n_o, n_i = s.c.shape, s.a.shape[0], s.b.shape[0]
    g = r * (2.0 * p.h / p.scale)
    cb = blockdiag_right(s.c, s.b)
    ac = blockdiag_left(s.a, s.c)
    ga = torch.bmm(g.reshape(n_o, p.bo, d_in), cb.reshape(n_o, p.bo, d_in).transpose(1, 2))
    gb = torch.bmm(ac.reshape(d_out, n_i, p.bi).permute(1, 2, 0), g.reshape(d_out, n_i, p.bi).transpose(0, 1))
    gc = _half_core_grad(s, g) * s.mask
    return ga, gb, gc


def _paper_iteration(p: _Problem, s: _State, opt: torch.optim.Adam, r: torch.Tensor, loss: float,
                     gen: torch.Generator) -> tuple[torch.Tensor, float]:
    # 1. one Adam step on A, B and the kept values; rejected if it raises the loss
    saved = (s.a.clone(), s.b.clone(), s.c.clone())
    s.a.grad, s.b.grad, s.c.grad = _adam_grads(p, s, r)
    opt.step()
    s.c.mul_(s.mask)
    r_new = _residual(p, s)
    loss_new = _loss(p, r_new)
    if not loss_new <= loss:
        s.a.copy_(saved[0])
        s.b.copy_(saved[1])
        s.c.copy_(saved[2])
        r_new, loss_new = r, loss
    r, loss = r_new, loss_new
    # 2. one exact group update per (output block, input tile)
    q_full = _half_core_grad(s, r * p.h)
    rows, groups = _sample_groups(p, q_full, gen)
    q, c, gram, n = _group_inputs(p, s, q_full, rows, groups)
    vals, keep, change = _solve_groups(q, c, gram, n)
    return _try_groups(p, s, r, loss, rows, groups, vals, keep, change < 0)


def _try_groups(p, s, r, loss, rows, groups, vals, keep, accept) -> tuple[torch.Tensor, float]:
    """Apply the accepted group updates; undo them if, in floating point, the loss went up."""
    if not bool(accept.any()):
        return r, loss
    d_out, d_in = s.c.shape
    rows, groups = rows[accept], groups[accept]
    old_c = s.c.view(d_out, d_in // GROUP, GROUP)[rows, groups]
    old_m = s.mask.view(d_out, d_in // GROUP, GROUP)[rows, groups]
    _apply_groups(s, rows, groups, vals[accept], keep[accept])
    r_new = _residual(p, s)
    loss_new = _loss(p, r_new)
    if loss_new <= loss:
        return r_new, loss_new
    _apply_groups(s, rows, groups, old_c, old_m)
    return r, loss


# ---------------------------------------------------------------- fast mode


def _spd_solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Batched solve of gram X = rhs for symmetric positive semi-definite gram, with a small ridge."""
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)
    ridge = 1e-6 * diag.mean(-1).clamp_min(TINY)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(gram + ridge[:, None, None] * eye)
    if bool((info != 0).any()):
        return torch.linalg.lstsq(gram + ridge[:, None, None] * eye, rhs).solution
    return torch.cholesky_solve(rhs, factor)


def _solve_a(p: _Problem, s: _State) -> torch.Tensor:
    n_o, d_in = s.a.shape[0], s.c.shape[1]
    y = blockdiag_right(s.c, s.b).reshape(n_o, p.bo, d_in)
    yh = y * p.h
    gram = torch.bmm(yh, y.transpose(1, 2))  # Y H Y^T
    rhs = torch.bmm(yh, p.wn.reshape(n_o, p.bo, d_in).transpose(1, 2))  # Y H Wn^T = (Wn H Y^T)^T
    return _spd_solve(gram, rhs).transpose(1, 2)


def _solve_b(p: _Problem, s: _State) -> torch.Tensor:
    d_out, n_i = s.c.shape[0], s.b.shape[0]
    z = blockdiag_left(s.a, s.c).reshape(d_out, n_i, p.bi).transpose(0, 1)  # (nI, d_out, bi)
    wn = p.wn.reshape(d_out, n_i, p.bi).transpose(0, 1)
    return _spd_solve(torch.bmm(z.transpose(1, 2), z), torch.bmm(z.transpose(1, 2), wn))


def _block_dot(p: _Problem, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per (I, J) block pair inner products, broadcast back to (d_out, d_in)."""
    d_out, d_in = x.shape
    n_o, n_i = d_out // p.bo, d_in // p.bi
    dots = (x * y).reshape(n_o, p.bo, n_i, p.bi).sum(dim=(1, 3), keepdim=True)
    return dots.expand(n_o, p.bo, n_i, p.bi).reshape(d_out, d_in)


def _cg_values(p: _Problem, s: _State, r: torch.Tensor, steps: int) -> torch.Tensor:
    """Conjugate gradients on the kept values, independently in every (I, J) block pair, from s.c."""
    ata = torch.bmm(_t(s.a), s.a)
    bhb = torch.bmm(s.b * p.h.view(s.b.shape[0], 1, p.bi), _t(s.b))
    x = s.c.clone()
    res = -_half_core_grad(s, r * p.h) * s.mask  # rhs - K x
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


def _mask_step(p: _Problem, s: _State, r: torch.Tensor, loss: float, share: float):
    """Exact update evaluated for every group; the best `share` of the improving ones applied together."""
    d_out, d_in = s.c.shape
    n_groups = d_in // GROUP
    q = _half_core_grad(s, r * p.h).reshape(d_out, n_groups, GROUP)
    c = s.c.reshape(d_out, n_groups, GROUP)
    n = s.a.square().sum(dim=1).reshape(d_out, 1).expand(d_out, n_groups)
    vals, keep, change = _solve_groups(q, c, _group_gram(s.b, p.h), n)
    change = change.reshape(-1)
    count = int((change < 0).sum())
    if count == 0:
        return r, loss, False
    pick = torch.topk(change, max(1, int(count * share)), largest=False).indices
    pick = pick[change[pick] < 0]
    rows, groups = pick // n_groups, pick % n_groups
    vals, keep = vals.reshape(-1, GROUP)[pick], keep.reshape(-1, GROUP)[pick]
    accept = torch.ones(pick.shape[0], dtype=torch.bool, device=pick.device)
    r_new, loss_new = _try_groups(p, s, r, loss, rows, groups, vals, keep, accept)
    return r_new, loss_new, loss_new < loss


def _try_update(p: _Problem, s: _State, r: torch.Tensor, loss: float, name: str,
                value: torch.Tensor) -> tuple[torch.Tensor, float]:
    old = getattr(s, name)
    setattr(s, name, value)
    r_new = _residual(p, s)
    loss_new = _loss(p, r_new)
    if math.isfinite(loss_new) and loss_new <= loss:
        return r_new, loss_new
    setattr(s, name, old)
    return r, loss


class _FastOptimizer:
    """Fast mode: one mask step, then `sweeps` rounds of (values by CG, A, B); every step kept only if it
    lowers the loss. `share` is the fraction of the improving groups applied together by the mask step: it
    shrinks when their interactions made the joint step fail and grows back after a success.
    (3 sweeps of 2 CG steps reached paper mode's 3000-iteration loss soonest on SmolLM2 q_proj.)"""

    def __init__(self, sweeps: int = 3, cg_steps: int = 2) -> None:
        self.share = 1.0
        self.sweeps = sweeps
        self.cg_steps = cg_steps

    def iteration(self, p: _Problem, s: _State, r: torch.Tensor, loss: float) -> tuple[torch.Tensor, float]:
        r, loss, ok = _mask_step(p, s, r, loss, self.share)
        self.share = min(1.0, self.share * 2) if ok else max(self.share / 4, 1e-4)
        for _ in range(self.sweeps):
            r, loss = _try_update(p, s, r, loss, "c", _cg_values(p, s, r, self.cg_steps))
            r, loss = _try_update(p, s, r, loss, "a", _solve_a(p, s))
            r, loss = _try_update(p, s, r, loss, "b", _solve_b(p, s))
        return r, loss


# ---------------------------------------------------------------- driver


def _check_inputs(weight: torch.Tensor, h: torch.Tensor, block_out: int, block_in: int, optimizer: str) -> None:
    if weight.dim() != 2:
        raise ValueError(f"armor_prune: weight must be 2-D, got shape {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    if d_in % GROUP:
        raise ValueError(f"armor_prune: d_in = {d_in} is not a multiple of 4 (2:4 groups)")
    if h.shape != (d_in,):
        raise ValueError(f"armor_prune: h must have shape ({d_in},), got {tuple(h.shape)}")
    if block_out < 1 or block_in < 1 or d_out % block_out or d_in % block_in:
        raise ValueError(
            f"armor_prune: block sizes ({block_out}, {block_in}) must divide the shape ({d_out}, {d_in})"
        )
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"armor_prune: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")


def _improved(new: float, old: float) -> bool:
    return new <= (1 - RTOL) * old and new <= old - ATOL


@dataclass(frozen=True)
class Plateau:
    """Fast mode's stopping rule: stop when the relative loss fell by less than ``tol`` (relatively) over the
    last ``window`` iterations. Chosen from the measured curve (docs/BENCHMARKS.md, "ARMOR convergence")."""

    window: int = 10
    tol: float = 0.002

    def reached(self, history: list[float]) -> bool:
        if len(history) <= self.window:
            return False
        before, now = history[-1 - self.window], history[-1]
        return before - now < self.tol * before


@dataclass(frozen=True)
class Snapshot:
    """A stopping rule watched during a longer run: an iteration cap and, optionally, a plateau."""

    iters: int
    plateau: Plateau | None = None


# Iteration caps when --iters is not given. Fast mode: cap 120 with the plateau rule above was the cheapest rule
# measured within 1% of the 240-iteration perplexity (docs/BENCHMARKS.md, "ARMOR convergence"); fast-gram keeps 60
# (not measured separately).
DEFAULT_ITERS = {"fast": 120, "paper": 20000, "fast-gram": 60}
DEFAULT_PLATEAU = Plateau()


class _Stopper:
    """Decides after every iteration whether to go on: cap, plateau (fast mode), patience (paper mode) or time."""

    def __init__(self, iters: int, plateau: Plateau | None, patience: int | None, time_limit: float | None) -> None:
        self.iters, self.plateau, self.patience, self.time_limit = iters, plateau, patience, time_limit
        self.left = patience
        self.reason = "cap"

    def stop(self, it: int, history: list[float], elapsed: list[float]) -> bool:
        if self.patience is not None:
            self.left = self.patience if _improved(history[-1], history[-2]) else self.left - 1
        if it >= self.iters:
            self.reason = "cap"
        elif self.plateau is not None and self.plateau.reached(history):
            self.reason = "plateau"
        elif self.patience is not None and self.left <= 0:
            self.reason = "patience"
        elif self.time_limit is not None and elapsed[-1] + (elapsed[-1] - elapsed[-2]) > self.time_limit:
            self.reason = "time_limit"  # the next iteration would end past the limit
        else:
            return False
        return True


def armor_prune(
    weight: torch.Tensor,
    h: torch.Tensor,
    block_out: int,
    block_in: int,
    *,
    optimizer: str = "fast",
    iters: int | None = None,
    seed: int = 0,
    lr: float = 1e-4,
    device: str | torch.device | None = None,
    patience: int = 100,
    plateau: Plateau | None | str = "default",
    time_limit: float | None = None,
    gram: torch.Tensor | None = None,
    gram_start: str = "sparsegpt",
    snapshots: Sequence[Snapshot] = (),
) -> ArmorResult:
    """Fit A' core B' ~ weight with a 2:4 core; see the module docstring.

    Stops at ``iters`` iterations (default: DEFAULT_ITERS of the optimiser); fast mode also on ``plateau``
    (default: DEFAULT_PLATEAU; None: never), paper mode after ``patience`` iterations without improvement (the
    official code's rule); both before an iteration that would end past ``time_limit`` seconds since the start.
    ``snapshots`` (fast and paper modes): other stopping rules watched along the way; ``result.snapshots[k]`` is
    the result where rule k would have stopped (the final result if it never fired), so that one long run gives
    the results of every shorter rule (bench/convergence_curve.py)."""
    _check_inputs(weight, h, block_out, block_in, optimizer)
    dev = torch.device(device) if device is not None else weight.device
    if optimizer in GRAM_OPTIMIZERS:
        if snapshots:
            raise ValueError(f"snapshots are not supported with optimizer {optimizer!r}")
        from offline_prune.methods._armor_full import armor_prune_gram

        return armor_prune_gram(
            weight.detach().float().to(dev), None if gram is None else gram.detach().to(dev), block_out, block_in,
            iters=DEFAULT_ITERS[optimizer] if iters is None else iters,
            plateau=DEFAULT_PLATEAU if plateau == "default" else plateau, time_limit=time_limit, start=gram_start)
    start = time.perf_counter()
    norm = normalize(weight.detach().to(dev))
    h = clean_h(h.detach().to(dev))
    h_mean = float(h.mean())
    p = _Problem(norm.weight, h / h_mean, 0.0, block_out, block_in)
    p.scale = float(proxy_scale(p.wn, p.h))
    d_out, d_in = p.wn.shape
    mask = nowag_p_mask(p.wn, p.h)
    s = _State(
        torch.eye(block_out, device=dev).expand(d_out // block_out, -1, -1).clone(),
        torch.eye(block_in, device=dev).expand(d_in // block_in, -1, -1).clone(),
        p.wn * mask,
        mask,
    )
    r = _residual(p, s)
    loss = init = _loss(p, r)
    history, elapsed = [loss / p.scale], [time.perf_counter() - start]
    gen = torch.Generator().manual_seed(seed)
    if optimizer == "paper":
        opt = torch.optim.Adam([s.a, s.b, s.c], lr=lr)

        def step(r: torch.Tensor, loss: float) -> tuple[torch.Tensor, float]:
            return _paper_iteration(p, s, opt, r, loss, gen)
    else:
        fast = _FastOptimizer()

        def step(r: torch.Tensor, loss: float) -> tuple[torch.Tensor, float]:
            return fast.iteration(p, s, r, loss)

    iters = DEFAULT_ITERS[optimizer] if iters is None else iters
    plateau = DEFAULT_PLATEAU if plateau == "default" else plateau
    is_fast = optimizer == "fast"
    stopper = _Stopper(iters, plateau if is_fast else None, None if is_fast else patience, time_limit)
    watched = [_Stopper(rule.iters, rule.plateau if is_fast else None, None, None) for rule in snapshots]
    taken: dict[int, ArmorResult] = {}

    def result(reason: str) -> ArmorResult:
        return _result(s, norm, history, elapsed, init * h_mean, loss * h_mean, reason)

    with torch.no_grad():
        it = 0
        while it < iters and not (time_limit is not None and elapsed[-1] > time_limit):
            it += 1
            r, loss = step(r, loss)
            history.append(loss / p.scale)
            elapsed.append(time.perf_counter() - start)
            for k, rule in enumerate(watched):
                if k not in taken and rule.stop(it, history, elapsed):
                    taken[k] = result(rule.reason)
            if stopper.stop(it, history, elapsed):
                break
        if iters == 0 or it == 0:
            stopper.reason = "cap" if iters == 0 else "time_limit"
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    final = result(stopper.reason)
    final.snapshots = [taken.get(k, final) for k in range(len(watched))]
    log.debug("armor %s %dx%d: relative loss %.5f -> %.5f in %d iterations, %.2fs",
              optimizer, d_out, d_in, history[0], history[-1], final.iterations, final.seconds)
    return final


def _result(s: _State, norm, history: list[float], elapsed: list[float], init_loss: float, final_loss: float,
            reason: str) -> ArmorResult:
    """The state as a result (copies), with the normaliser folded into A and B."""
    bo, bi = s.a.shape[1], s.b.shape[1]
    a = s.a * norm.row_scale.view(-1, bo, 1)
    b = s.b * norm.col_scale.view(-1, 1, bi)
    return ArmorResult(
        a_blocks=a.contiguous(), b_blocks=b.contiguous(), core=s.c.clone(), mask=s.mask.clone(),
        history=list(history), init_loss=init_loss, final_loss=final_loss, init_relative=history[0],
        final_relative=history[-1], iterations=len(history) - 1, seconds=elapsed[-1], elapsed=list(elapsed),
        stopped=reason,
    )


# ---------------------------------------------------------------- registry entry


def _prune(weight: torch.Tensor, stats: InputStats | None, h: torch.Tensor, options: Mapping[str, Any], seed: int,
           device: str) -> PruneOutput:
    d_out, d_in = weight.shape
    bs_out, bs_in = block_sizes(d_out, d_in, options)
    optimizer = chosen_optimizer(options)
    gram = stats.gram if optimizer in GRAM_OPTIMIZERS and stats is not None else None
    res = armor_prune(
        weight, h, bs_out, bs_in, optimizer=optimizer, iters=options["iters"], seed=seed, device=device,
        time_limit=options.get(TIME_LIMIT), gram=gram, plateau=plateau_of(options),
    )
    return prune_output(res, optimizer, gram is not None)


def plateau_of(options: Mapping[str, Any]) -> Plateau | None:
    """The plateau rule of the options (plateau_tol 0: none)."""
    return Plateau(options["plateau_window"], options["plateau_tol"]) if options["plateau_tol"] > 0 else None


def prune_output(res: ArmorResult, optimizer: str, used_gram: bool = False) -> PruneOutput:
    """The registry's PruneOutput of one result, with ARMOR's report fields."""
    (n_o, bs_out, _), (n_i, bs_in, _) = res.a_blocks.shape, res.b_blocks.shape
    extra = {"block_out": bs_out, "block_in": bs_in, "optimizer": optimizer,
             "ab_overhead": round(ab_overhead(n_o * bs_out, n_i * bs_in, bs_out, bs_in), 6), "stopped": res.stopped}
    if used_gram:  # its own objective, ||(W_hat - W) X^T||^2 / ||W X^T||^2: SparseGPT's, then its result
        extra |= {"layer_loss_sparsegpt_relative": res.init_relative, "layer_loss_final_relative": res.final_relative}
    return PruneOutput(res.core, res.mask, res.a_blocks, res.b_blocks, res.iterations, extra)


def _uses_gram(options: Mapping[str, Any]) -> bool:
    """fast-gram needs X^T X and, like SparseGPT (its start), statistics of the already-pruned earlier layers."""
    return chosen_optimizer(options) in GRAM_OPTIMIZERS


METHOD = PruningMethod(
    name="armor", prune=_prune, order=0, tune_epochs=TUNE_EPOCHS,
    options=(
        MethodOption("block_size", AUTO, block_size_arg,
                     "ARMOR block size: 'auto' = per matrix the largest size whose A+B stay within --max-overhead; "
                     "N = per dimension the largest divisor that is a multiple of 4 and <= N"),
        MethodOption("max_overhead", 0.125, float,
                     "with --block-size auto: A+B parameters per kept core value, at most (paper: ~0.09-0.12)"),
        MethodOption("ab_dtype", "model", str, "dtype of A and B in the checkpoint: the model's, or float32",
                     choices=AB_DTYPES),
        MethodOption("optimizer", AUTO, str,
                     "ARMOR optimiser (fast: exact block steps on the NoWag proxy; paper: Adam + sampling; fast-gram: "
                     "exact block steps on the full X^T X layer objective from SparseGPT's start, sequential; auto: "
                     f"fast-gram when --block-size auto and --max-overhead < {AUTO_GRAM_BELOW}, else fast)",
                     choices=(AUTO, *OPTIMIZERS)),
        MethodOption("plateau_tol", DEFAULT_PLATEAU.tol, float,
                     "fast mode stops when the relative loss fell by less than this fraction over the last "
                     "--plateau-window iterations (0: only the cap stops it)"),
        MethodOption("plateau_window", DEFAULT_PLATEAU.window, int, "iterations the plateau rule looks back"),
        MethodOption("iters", None, int, "ARMOR iteration cap per matrix (default: fast 120 and fast-gram 60, with a "
                     "plateau stop; paper 20000, the paper's setting)"),
    ),
    iterative=True,
    sequential=_uses_gram,
    needs_gram=_uses_gram,
)
