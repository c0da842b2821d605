"""Tests of ARMOR's fast-gram optimiser (offline_prune.methods.armor.fast_gram): the full X^T X layer objective,
SparseGPT's start, monotone history, exact group solve, determinism, registry flags."""

from __future__ import annotations

import pytest
import torch
from armor_fixtures import random_weight

from offline_prune.methods import get_method
from offline_prune.methods.armor import armor_prune
from offline_prune.methods.armor import fast_gram as full
from offline_prune.methods.armor.core import half_core_grad, solve_groups
from offline_prune.methods.sparsegpt import sparsegpt_2of4
from vllm_armor.blockdiag import blockdiag_dense
from vllm_armor.checkpoint_format import mask_is_2of4

pytestmark = pytest.mark.usefixtures("one_thread")


def _matrix(d_out: int, d_in: int, seed: int = 0) -> torch.Tensor:
    return random_weight(d_out, d_in, seed)


def _gram(d_in: int, seed: int = 1, tokens: int = 400) -> torch.Tensor:
    """X^T X of correlated inputs with uneven scales (an outlier-like column spread), as in a real layer."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g) @ torch.randn(d_in, d_in, generator=g) / d_in**0.5
    x = x + torch.randn(tokens, d_in, generator=g)
    x = x * torch.exp(torch.randn(d_in, generator=g))
    return x.T @ x


def _true_relative(w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor) -> float:
    e = w_hat - w
    return float(((e @ gram) * e).sum() / ((w @ gram) * w).sum())


def _w_hat(res) -> torch.Tensor:
    return blockdiag_dense(res.a_blocks) @ res.core @ blockdiag_dense(res.b_blocks)


def _run(w, gram, bo=8, bi=8, iters=15, **kw):
    return armor_prune(w, gram.diagonal().clone(), bo, bi, optimizer="fast-gram", iters=iters, plateau=None,
                       gram=gram, **kw)


@pytest.mark.parametrize("blocks", [(8, 8), (16, 32), (4, 2)], ids=["8", "16x32", "odd-tiles"])
def test_monotone_from_sparsegpt_and_factors_have_the_reported_loss(blocks: tuple[int, int]) -> None:
    w, gram = _matrix(32, 64), _gram(64)
    res = _run(w, gram, *blocks)
    sgpt, _ = sparsegpt_2of4(w, gram)
    assert res.history[0] == pytest.approx(_true_relative(w, sgpt, gram), rel=1e-4)  # starts at SparseGPT
    assert all(b <= a for a, b in zip(res.history, res.history[1:], strict=False)), "history rose"
    assert res.final_relative < 0.8 * res.init_relative  # it does move
    assert mask_is_2of4(res.mask) and torch.all(res.core[~res.mask] == 0)
    assert _true_relative(w, _w_hat(res), gram) == pytest.approx(res.final_relative, rel=1e-3, abs=1e-6)


def test_better_than_the_diagonal_proxy_on_the_layer_objective() -> None:
    # fast mode optimises the NoWag proxy (diag X^T X); on the true objective fast-gram must win clearly
    w, gram = _matrix(64, 128, seed=2), _gram(128, seed=3)
    gram_res = _run(w, gram, 16, 16, iters=20)
    diag_res = armor_prune(w, gram.diagonal().clone(), 16, 16, optimizer="fast", iters=20, plateau=None)
    assert gram_res.final_relative < 0.8 * _true_relative(w, _w_hat(diag_res), gram)


def test_nowag_start_is_an_option_and_also_monotone() -> None:
    w, gram = _matrix(32, 64, seed=4), _gram(64, seed=5)
    res = _run(w, gram, gram_start="nowag-p")
    assert all(b <= a for a, b in zip(res.history, res.history[1:], strict=False))
    with pytest.raises(ValueError, match="start must be"):
        _run(w, gram, gram_start="magnitude")


def test_deterministic() -> None:
    w, gram = _matrix(32, 64, seed=7), _gram(64, seed=8)
    r1, r2 = _run(w, gram, iters=8), _run(w, gram, iters=8)
    assert r1.history == r2.history
    assert torch.equal(r1.core, r2.core) and torch.equal(r1.mask, r2.mask)
    assert torch.equal(r1.a_blocks, r2.a_blocks) and torch.equal(r1.b_blocks, r2.b_blocks)


def test_group_solve_is_exact_under_a_full_gram() -> None:
    """The predicted loss change of one group's re-solve equals the real one (A, B not identity)."""
    w, gram = _matrix(16, 32, seed=9), _gram(32, seed=10)
    p, d = full.make_problem(w, gram, 8, 8)
    s = full.start_state(p, w, gram, d, "sparsegpt")
    g = torch.Generator().manual_seed(0)
    s.a += 0.1 * torch.randn(s.a.shape, generator=g)
    s.b += 0.1 * torch.randn(s.b.shape, generator=g)
    f = p.fit(s)
    q = half_core_grad(s, f.rh).reshape(16, 8, 4)
    c = s.c.reshape(16, 8, 4)
    n = s.a.square().sum(dim=1).reshape(16, 1).expand(16, 8)
    vals, keep, change = solve_groups(q, c, p.group_gram(s), n)
    row, grp = 5, 3
    s.c.view(16, 8, 4)[row, grp] = vals[row, grp] * keep[row, grp]
    assert p.fit(s).loss - f.loss == pytest.approx(float(change[row, grp]), rel=1e-3, abs=1e-5 * f.loss)


def test_missing_gram_is_refused() -> None:
    w = _matrix(16, 32)
    with pytest.raises(ValueError, match="needs gram"):
        armor_prune(w, torch.ones(32), 8, 8, optimizer="fast-gram", iters=2)


def test_registry_flags_follow_the_optimizer() -> None:
    method = get_method("armor")
    fast, gram = method.resolve({}), method.resolve({"optimizer": "fast-gram"})
    assert not method.wants_gram(fast) and not method.is_sequential(fast)
    assert method.wants_gram(gram) and method.is_sequential(gram)
    sgpt = get_method("sparsegpt")
    assert sgpt.wants_gram({}) and sgpt.is_sequential({})


def test_auto_optimizer_takes_fast_gram_under_a_small_budget_only() -> None:
    from offline_prune.methods.armor import AUTO_GRAM_BELOW, chosen_optimizer

    method = get_method("armor")
    default = method.resolve({})
    assert default["optimizer"] == "auto" and chosen_optimizer(default) == "fast"  # default budget 0.125
    small = method.resolve({"max_overhead": 0.03})
    assert chosen_optimizer(small) == "fast-gram" and method.wants_gram(small) and method.is_sequential(small)
    edge = method.resolve({"max_overhead": AUTO_GRAM_BELOW})
    assert chosen_optimizer(edge) == "fast" and not method.wants_gram(edge)
    forced = method.resolve({"max_overhead": 0.03, "block_size": 16})  # a forced block size: the user's choice
    assert chosen_optimizer(forced) == "fast"
    for name in ("fast", "paper", "fast-gram"):  # an explicit optimiser is kept whatever the budget
        assert chosen_optimizer(method.resolve({"optimizer": name, "max_overhead": 0.03})) == name
    w = _matrix(64, 64)
    from offline_prune.statistics import InputStats

    stats = InputStats(64, True)
    stats.add(torch.randn(300, 64) * torch.exp(torch.randn(64)))
    out = method.prune(w, stats, stats.h, {**method.resolve({"max_overhead": 0.09}), "iters": 3}, 0, "cpu")
    assert out.report_extra["optimizer"] == "fast-gram" and "layer_loss_final_relative" in out.report_extra
