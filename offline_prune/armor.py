"""ARMOR: factor one weight matrix as W ~ A (W' * M) B with a 2:4 core and block-diagonal A, B.

Notation. W is d_out x d_in, h = diag(X^T X) the input energies of its calibration inputs. NoWag
normalisation (see `proxy`): W = diag(r) Wn diag(c). A = blockdiag(A_1..A_p) with bo x bo blocks,
B = blockdiag(B_1..B_q) with bi x bi blocks, C = V * M the core (M keeps 2 of every 4 consecutive inputs).

    L(A, C, B) = sum_ij h_j (A C B - Wn)_ij^2 ,   reported relative to sum_ij h_j Wn_ij^2.

Init: A = B = I, M = NoWag-P mask (top 2 of Wn_ij^2 h_j per group), V = Wn, so L starts at NoWag-P's loss.
Afterwards the normaliser is folded in: A'_I = diag(r_I) A_I and B'_J = B_J diag(c_J), so A' C B' ~ W.

Locality. (A C B)[I, J] = A_I C[I, J] B_J: the loss is a sum of independent terms, one per (output block I,
input tile J). Tiles are input spans of lcm(bi, 4) columns, so that a group of 4 never straddles two tiles.

Exact group update. Re-solving group g (inputs 4g..4g+3) of row r with everything else fixed: with a = A[:, r]
(supported on r's block), P = the 4 rows of B at the group (restricted to its tile), Q = P diag(h) P^T,
G = grad_C L = 2 A^T ((A C B - Wn) diag(h)) B^T and u the group's current values,

    f = G[r, g] / 2 - |a|^2 Q u          (the linear term with the group removed)
    for a pattern S (2 of the 4 inputs):  u_S = -Q_SS^-1 f_S / |a|^2 ,  change = -f_S^T Q_SS^-1 f_S / |a|^2

relative to the loss with the group zeroed. The best of the 6 patterns is never worse than the current
state (which is one of the candidates), and updates in different (I, J) pairs are exact simultaneously.

optimizer="paper" (the published algorithm): per iteration one Adam step (lr 1e-4) on A, B and V, then in
every (I, J) pair one group, drawn with probability proportional to the L1 norm of G over the group, is
re-solved exactly.

optimizer="fast" (ours, same loss, every step monotone): per iteration
  1. A: each A_I is the closed-form least-squares optimum with C, B fixed: A_I = (Wn_I D P_I^T)(P_I D P_I^T)^-1,
     P = C B, D = diag(h).
  2. B: each B_J is the least-squares optimum with A, C fixed; per column the weight h_j cancels:
     B_J = (K_J^T K_J)^-1 K_J^T Wn_J with K = A C restricted to the columns of block J.
  3. V: a few conjugate-gradient steps on the (convex quadratic) loss in the kept values, matrix-free.
  4. M: for every row and tile the group with the largest predicted decrease is re-solved exactly; all rows
     at once (a Jacobi step), kept per (I, J) pair only where that pair's loss went down, else the pair's
     single best group is applied (exact).
Each step that fails to lower the loss (numerical round-off) is reverted, so the history never rises and the
final loss is never above NoWag-P's (Theorem 3.1). Early stop (both modes): an iteration that improves the
loss by less than a relative 1e-6 or an absolute 1e-8 costs one unit of patience (100).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from offline_prune.proxy import clean_h, normalize, nowag_p_mask

PATTERNS = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])
RTOL, ATOL = 1e-6, 1e-8
CG_STEPS = 4


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


class _Problem:
    """Fixed data of one factorisation and the block algebra on it."""

    def __init__(self, wn: torch.Tensor, h: torch.Tensor, bo: int, bi: int) -> None:
        self.wn, self.h = wn, h
        self.d_out, self.d_in = wn.shape
        self.bo, self.bi = bo, bi
        self.n_o, self.n_i = self.d_out // bo, self.d_in // bi
        self.tw = bi * 4 // math.gcd(bi, 4)  # tile width: whole groups and whole B blocks
        self.n_t = self.d_in // self.tw
        self.scale = float((wn.square() * h).sum())

    def right_b(self, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """x @ blockdiag(B) for x (rows, d_in)."""
        return torch.einsum("rnk,nkj->rnj", x.reshape(-1, self.n_i, self.bi), b).reshape(x.shape)

    def left_a(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """blockdiag(A) @ x for x (d_out, cols)."""
        return torch.bmm(a, x.reshape(self.n_o, self.bo, -1)).reshape(x.shape)

    def w_hat(self, a, core, b) -> torch.Tensor:
        return self.left_a(a, self.right_b(core, b))

    def loss(self, a, core, b) -> torch.Tensor:
        return ((self.w_hat(a, core, b) - self.wn).square() * self.h).sum()

    def pair_losses(self, a, core, b) -> torch.Tensor:
        """Loss of every (output block, input tile) pair: (n_o, n_t)."""
        err = (self.w_hat(a, core, b) - self.wn).square() * self.h
        return err.reshape(self.n_o, self.bo, self.n_t, self.tw).sum((1, 3))

    def core_grad(self, a, core, b) -> torch.Tensor:
        """G = 2 A^T ((A C B - Wn) diag(h)) B^T."""
        r = (self.w_hat(a, core, b) - self.wn) * self.h
        r = self.left_a(a.transpose(1, 2), r)
        return 2 * self.right_b(r, b.transpose(1, 2))

    def tiles_of_b(self, b: torch.Tensor) -> torch.Tensor:
        """B as (n_t, tw, tw) dense tiles (block-diagonal inside each tile)."""
        if self.tw == self.bi:
            return b
        per = self.tw // self.bi
        tiles = b.new_zeros(self.n_t, self.tw, self.tw)
        blocks = b.reshape(self.n_t, per, self.bi, self.bi)
        for k in range(per):  # at most 4 sub-blocks per tile
            tiles[:, k * self.bi : (k + 1) * self.bi, k * self.bi : (k + 1) * self.bi] = blocks[:, k]
        return tiles

    def group_q(self, b: torch.Tensor) -> torch.Tensor:
        """Q = P diag(h) P^T for every group position: (d_in/4, 4, 4)."""
        rows = self.tiles_of_b(b).reshape(self.n_t, self.tw // 4, 4, self.tw)
        h = self.h.reshape(self.n_t, 1, 1, self.tw)
        return torch.einsum("tgkj,tglj->tgkl", rows * h, rows).reshape(-1, 4, 4)


def _solve_groups(f: torch.Tensor, q: torch.Tensor, an2: torch.Tensor):
    """Best pattern per group: f (..., 4), q (..., 4, 4) and an2 (...) broadcast together.

    Returns (pattern index, values (..., 2), loss change relative to the group zeroed)."""
    i, j = PATTERNS[:, 0].to(f.device), PATTERNS[:, 1].to(f.device)
    q11, q22, q12 = q[..., i, i], q[..., j, j], q[..., i, j]  # (..., 6)
    f1, f2 = f[..., i], f[..., j]
    damp = 1e-12 * (q11 + q22).clamp_min(1e-30)
    det = (q11 + damp) * (q22 + damp) - q12.square()
    det = torch.where(det.abs() < 1e-30, torch.full_like(det, 1e-30), det)
    x1 = ((q22 + damp) * f1 - q12 * f2) / det  # Q_SS^-1 f_S
    x2 = ((q11 + damp) * f2 - q12 * f1) / det
    an2 = an2.clamp_min(1e-20).unsqueeze(-1)
    change = -(f1 * x1 + f2 * x2) / an2
    x1, x2 = x1.expand_as(change), x2.expand_as(change)
    best = change.argmin(-1, keepdim=True)
    values = -torch.stack((x1.gather(-1, best), x2.gather(-1, best)), -1).squeeze(-2) / an2
    return best.squeeze(-1), values, change.gather(-1, best).squeeze(-1)


class _Factors:
    """The variables: A blocks, B blocks, dense values V and the boolean mask M (core = V * M)."""

    def __init__(self, p: _Problem, mask: torch.Tensor) -> None:
        eye_o = torch.eye(p.bo, device=p.wn.device)
        eye_i = torch.eye(p.bi, device=p.wn.device)
        self.a = eye_o.repeat(p.n_o, 1, 1)
        self.b = eye_i.repeat(p.n_i, 1, 1)
        self.v = p.wn.clone()
        self.m = mask

    @property
    def core(self) -> torch.Tensor:
        return self.v * self.m

    def snapshot(self):
        return self.a.clone(), self.b.clone(), self.v.clone(), self.m.clone()

    def restore(self, snap) -> None:
        self.a, self.b, self.v, self.m = (t.clone() for t in snap)


def _group_terms(p: _Problem, x: _Factors):
    """f, u, G (d_out, d_in/4, 4), q (d_in/4, 4, 4) and |a|^2 (d_out, 1) for every group of the matrix."""
    core = x.core
    g = p.core_grad(x.a, core, x.b).reshape(p.d_out, -1, 4)
    q = p.group_q(x.b)  # (d_in/4, 4, 4)
    an2 = x.a.square().sum(1).reshape(p.d_out)  # column norms of A: |A[:, r]|^2
    u = core.reshape(p.d_out, -1, 4)
    f = g / 2 - an2[:, None, None] * torch.einsum("gkl,rgl->rgk", q, u)
    return f, q, an2[:, None], u, g


def _apply_groups(p: _Problem, x: _Factors, rows: torch.Tensor, groups: torch.Tensor, pattern, values) -> None:
    """Set the selected groups (rows[k], groups[k]) to ``pattern``/``values``."""
    pats = PATTERNS.to(rows.device)[pattern]  # (k, 2)
    m = x.m.reshape(p.d_out, -1, 4)
    v = x.v.reshape(p.d_out, -1, 4)
    m[rows, groups] = False
    v[rows, groups] = 0.0
    for s in range(2):
        m[rows, groups, pats[:, s]] = True
        v[rows, groups, pats[:, s]] = values[:, s]


def _pair_of(p: _Problem, rows: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    return (rows // p.bo) * p.n_t + (groups * 4) // p.tw


def _paper_group_step(p: _Problem, x: _Factors, gen: torch.Generator) -> None:
    """One group per (I, J) pair, drawn by the L1 norm of the gradient over the group, re-solved exactly."""
    f, q, an2, _u, g = _group_terms(p, x)
    gpt = p.tw // 4
    weights = g.abs().sum(-1).reshape(p.n_o, p.bo, p.n_t, gpt).permute(0, 2, 1, 3).reshape(-1, p.bo * gpt)
    pick = torch.multinomial(weights + 1e-30, 1, generator=gen).squeeze(1)  # (n_pairs,)
    pair = torch.arange(weights.shape[0], device=pick.device)
    rows = (pair // p.n_t) * p.bo + pick // gpt
    groups = (pair % p.n_t) * gpt + pick % gpt
    pattern, values, _ = _solve_groups(f[rows, groups], q[groups], an2[rows, 0])
    _apply_groups(p, x, rows, groups, pattern, values)


def _fast_mask_step(p: _Problem, x: _Factors) -> None:
    """Per row and tile the best group (largest predicted decrease), all rows at once, checked per pair."""
    f, q, an2, u, _g = _group_terms(p, x)
    pattern, values, change = _solve_groups(f, q, an2)
    current = 2 * (f * u).sum(-1) + an2 * torch.einsum("rgk,gkl,rgl->rg", u, q, u)
    gain = current - change  # >= 0: the decrease of the loss if only this group moves
    gpt = p.tw // 4
    best = gain.reshape(p.d_out, p.n_t, gpt).argmax(-1)  # per row and tile
    rows = torch.arange(p.d_out, device=best.device).repeat_interleave(p.n_t)
    groups = (torch.arange(p.n_t, device=best.device) * gpt + best).reshape(-1)
    useful = gain[rows, groups] > 0
    rows, groups = rows[useful], groups[useful]
    if rows.numel() == 0:
        return
    before = p.pair_losses(x.a, x.core, x.b).reshape(-1)
    snap_m, snap_v = x.m.clone(), x.v.clone()
    _apply_groups(p, x, rows, groups, pattern[rows, groups], values[rows, groups])
    worse = p.pair_losses(x.a, x.core, x.b).reshape(-1) > before  # (n_o * n_t,)
    if not bool(worse.any()):
        return
    # Pairs that got worse: undo, then move only the pair's single best group (exact).
    cell_pair = _pair_of(p, torch.arange(p.d_out, device=worse.device)[:, None],
                         torch.arange(p.d_in // 4, device=worse.device)[None, :]).repeat_interleave(4, dim=1)
    undo = worse[cell_pair]
    x.m = torch.where(undo, snap_m, x.m)
    x.v = torch.where(undo, snap_v, x.v)
    per_pair = gain.reshape(p.n_o, p.bo, p.n_t, gpt).permute(0, 2, 1, 3).reshape(p.n_o * p.n_t, -1)
    pick = per_pair.argmax(-1)
    pair = worse.nonzero().squeeze(1)
    pick = pick[pair]
    rows = (pair // p.n_t) * p.bo + pick // gpt
    groups = (pair % p.n_t) * gpt + pick % gpt
    _apply_groups(p, x, rows, groups, pattern[rows, groups], values[rows, groups])


def _solve_a(p: _Problem, x: _Factors) -> None:
    pc = p.right_b(x.core, x.b).reshape(p.n_o, p.bo, p.d_in)
    s = torch.einsum("nij,nkj->nik", pc * p.h, pc)
    t = torch.einsum("nij,nkj->nik", p.wn.reshape(p.n_o, p.bo, p.d_in) * p.h, pc)
    x.a = _ridge_solve(s, t.transpose(1, 2)).transpose(1, 2)


def _solve_b(p: _Problem, x: _Factors) -> None:
    k = p.left_a(x.a, x.core).reshape(p.d_out, p.n_i, p.bi)
    ktk = torch.einsum("onk,onl->nkl", k, k)
    ktw = torch.einsum("onk,onl->nkl", k, p.wn.reshape(p.d_out, p.n_i, p.bi))
    x.b = _ridge_solve(ktk, ktw)


def _ridge_solve(s: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve s X = rhs for symmetric PSD s (batched), with a tiny ridge for rank-deficient blocks."""
    n = s.shape[-1]
    ridge = 1e-7 * s.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    eye = torch.eye(n, device=s.device, dtype=s.dtype)
    chol, info = torch.linalg.cholesky_ex(s + ridge[:, None, None] * eye)
    if bool((info > 0).any()):
        return torch.linalg.lstsq(s + ridge[:, None, None] * eye, rhs).solution
    return torch.cholesky_solve(rhs, chol)


def _cg_values(p: _Problem, x: _Factors, steps: int) -> None:
    """Conjugate gradients on the kept values (the loss is quadratic in them), matrix-free."""

    def normal_op(v: torch.Tensor) -> torch.Tensor:  # (grad of L at v) - (grad at 0), masked
        r = p.w_hat(x.a, v * x.m, x.b) * p.h
        return 2 * p.right_b(p.left_a(x.a.transpose(1, 2), r), x.b.transpose(1, 2)) * x.m

    v = x.v * x.m
    r = -p.core_grad(x.a, v, x.b) * x.m
    d = r.clone()
    rr = (r * r).sum()
    for _ in range(steps):
        if float(rr) <= 1e-30:
            break
        nd = normal_op(d)
        alpha = rr / (d * nd).sum().clamp_min(1e-30)
        v = v + alpha * d
        r = r - alpha * nd
        rr_new = (r * r).sum()
        d = r + (rr_new / rr) * d
        rr = rr_new
    x.v = v


def _guarded(p: _Problem, x: _Factors, step, loss: float) -> float:
    """Run ``step``; keep it only if the loss did not rise. Returns the loss after."""
    snap = x.snapshot()
    step()
    new = float(p.loss(x.a, x.core, x.b))
    if not math.isfinite(new) or new > loss:
        x.restore(snap)
        return loss
    return new


def _stalled(prev: float, cur: float, scale: float) -> bool:
    return cur > (1 - RTOL) * prev or (cur / scale) > (prev / scale) - ATOL


def armor_prune(
    weight: torch.Tensor,
    h: torch.Tensor,
    block_out: int,
    block_in: int,
    *,
    optimizer: str = "fast",
    iters: int = 2000,
    seed: int = 0,
    lr: float = 1e-4,
    device: str | torch.device | None = None,
    patience: int = 100,
) -> ArmorResult:
    """Factor ``weight`` (d_out x d_in) as A' core B' minimising the NoWag proxy loss; see the module doc."""
    start = time.perf_counter()
    device = torch.device(device) if device is not None else weight.device
    d_out, d_in = weight.shape
    if d_out % block_out or d_in % block_in:
        raise ValueError(f"block sizes ({block_out}, {block_in}) must divide the shape ({d_out}, {d_in})")
    if d_in % 4:
        raise ValueError(f"2:4 needs d_in divisible by 4, got {d_in}")
    if optimizer not in ("fast", "paper"):
        raise ValueError(f"optimizer must be 'fast' or 'paper', got {optimizer!r}")
    norm = normalize(weight.to(device))
    h = clean_h(h.to(device))
    p = _Problem(norm.weight, h, block_out, block_in)
    x = _Factors(p, nowag_p_mask(p.wn, h))
    loss = float(p.loss(x.a, x.core, x.b))
    init_loss = loss
    history = [loss / p.scale]
    gen = torch.Generator(device=device).manual_seed(seed)
    torch.manual_seed(seed)
    step = _paper_iteration(p, x, lr, gen) if optimizer == "paper" else _fast_iteration(p, x)
    left = patience
    while len(history) <= iters and left > 0:
        new = step(loss)
        left = left - 1 if _stalled(loss, new, p.scale) else patience
        loss = new
        history.append(loss / p.scale)
    core = x.core
    a = x.a * norm.row_scale.reshape(p.n_o, p.bo, 1)
    b = x.b * norm.col_scale.reshape(p.n_i, 1, p.bi)
    return ArmorResult(
        a_blocks=a.float(), b_blocks=b.float(), core=core.float(), mask=x.m.clone(), history=history,
        init_loss=init_loss, final_loss=loss, init_relative=history[0], final_relative=history[-1],
        iterations=len(history) - 1, seconds=time.perf_counter() - start,
    )


def _paper_iteration(p: _Problem, x: _Factors, lr: float, gen: torch.Generator):
    a = x.a.clone().requires_grad_(True)
    b = x.b.clone().requires_grad_(True)
    v = x.v.clone().requires_grad_(True)
    adam = torch.optim.Adam([a, b, v], lr=lr)

    def adam_step() -> None:
        with torch.enable_grad():
            adam.zero_grad()
            (p.loss(a, v * x.m, b) / p.scale).backward()
            adam.step()
        x.a, x.b, x.v = a.detach().clone(), b.detach().clone(), v.detach().clone()

    def iteration(loss: float) -> float:
        loss = _guarded(p, x, adam_step, loss)
        loss = _guarded(p, x, lambda: _paper_group_step(p, x, gen), loss)
        with torch.no_grad():  # Adam continues from the accepted state
            a.copy_(x.a)
            b.copy_(x.b)
            v.copy_(x.v)
        return loss

    return iteration


def _fast_iteration(p: _Problem, x: _Factors):
    @torch.no_grad()
    def iteration(loss: float) -> float:
        loss = _guarded(p, x, lambda: _solve_a(p, x), loss)
        loss = _guarded(p, x, lambda: _solve_b(p, x), loss)
        loss = _guarded(p, x, lambda: _cg_values(p, x, CG_STEPS), loss)
        return _guarded(p, x, lambda: _fast_mask_step(p, x), loss)

    return iteration
