"""Tests of the per-matrix ARMOR optimiser (offline_prune.methods.armor): guarantee, format, exactness, determinism."""

from __future__ import annotations

import itertools

import pytest
import torch
from armor_fixtures import random_weight

from offline_prune.methods import armor
from offline_prune.methods.armor import DEFAULT_PLATEAU, Plateau, Snapshot, armor_prune
from offline_prune.methods.armor.nowag import group_gram
from offline_prune.proxy import normalize, nowag_p_mask, proxy_loss, proxy_scale
from vllm_armor.blockdiag import blockdiag_dense
from vllm_armor.checkpoint_format import mask_is_2of4
from vllm_armor.kernels import factored_forward

OPTIMIZERS = ("paper", "fast")


pytestmark = pytest.mark.usefixtures("one_thread")


def _matrix(d_out: int, d_in: int, seed: int = 0) -> torch.Tensor:
    return random_weight(d_out, d_in, seed)


def _h(d_in: int, seed: int = 1, spread: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(spread * torch.randn(d_in, generator=g))


def _relative_of_result(w: torch.Tensor, h: torch.Tensor, res: armor.ArmorResult) -> float:
    """Relative proxy loss of the returned factors, recomputed from scratch in the normalised space."""
    w_hat = blockdiag_dense(res.a_blocks) @ res.core @ blockdiag_dense(res.b_blocks)
    norm = normalize(w)
    w_hat_n = w_hat / norm.row_scale[:, None] / norm.col_scale[None, :]
    return float(proxy_loss(w_hat_n, norm.weight, h) / proxy_scale(norm.weight, h))


def _nowag_p_relative(w: torch.Tensor, h: torch.Tensor) -> float:
    wn = normalize(w).weight
    return float(proxy_loss(wn * nowag_p_mask(wn, h), wn, h) / proxy_scale(wn, h))


def _check_guarantee(w: torch.Tensor, h: torch.Tensor, res: armor.ArmorResult) -> None:
    hist = res.history
    assert len(hist) == res.iterations + 1
    assert hist[0] == pytest.approx(_nowag_p_relative(w, h), rel=1e-5)
    assert all(b <= a for a, b in zip(hist, hist[1:], strict=False)), "history rose"
    assert res.final_relative <= res.init_relative
    assert res.final_loss <= res.init_loss
    assert res.final_relative == hist[-1]
    assert mask_is_2of4(res.mask)
    assert torch.all(res.core[~res.mask] == 0)
    # the returned factors (normaliser folded in) really have the reported loss
    assert _relative_of_result(w, h, res) == pytest.approx(res.final_relative, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("spread", [0.5, 4.0], ids=["random-h", "skewed-h"])
def test_monotone_and_never_worse_than_nowag_p(optimizer: str, spread: float) -> None:
    w, h = _matrix(64, 128), _h(128, spread=spread)
    if spread > 1:
        assert h.max() / h.min() > 1e4  # strongly non-uniform
    res = armor_prune(w, h, 16, 16, optimizer=optimizer, iters=25)
    _check_guarantee(w, h, res)
    assert res.final_relative < res.init_relative  # it does move


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_factors_match_the_module_forward(optimizer: str) -> None:
    w, h = _matrix(48, 64, seed=3), _h(64)
    res = armor_prune(w, h, 16, 32, optimizer=optimizer, iters=10)
    assert res.a_blocks.shape == (3, 16, 16) and res.b_blocks.shape == (2, 32, 32)
    assert res.core.shape == w.shape and res.core.dtype == torch.float32
    x = torch.randn(7, 64)
    y = factored_forward(x, [res.core], [res.a_blocks], [res.b_blocks], None)
    w_hat = blockdiag_dense(res.a_blocks) @ res.core @ blockdiag_dense(res.b_blocks)
    torch.testing.assert_close(y, x @ w_hat.T, rtol=1e-4, atol=1e-4)
    # A' core B' approximates W itself (normaliser folded in), better than the NoWag-P pruned W
    nowag = w * nowag_p_mask(normalize(w).weight, h)
    assert (w_hat - w).norm() < (nowag - w).norm()


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("blocks", [(1, 1), (32, 64), (1, 64), (32, 2)], ids=["1", "full", "1xfull", "odd-tiles"])
def test_block_sizes(optimizer: str, blocks: tuple[int, int]) -> None:
    w, h = _matrix(32, 64, seed=5), _h(64)
    res = armor_prune(w, h, *blocks, optimizer=optimizer, iters=15)
    _check_guarantee(w, h, res)
    if blocks == (1, 1):
        # diagonal A and B only rescale the core, so {A C B} = {2:4 cores} and NoWag-P is already optimal
        assert res.a_blocks.shape == (32, 1, 1) and res.b_blocks.shape == (64, 1, 1)
        assert res.final_relative == pytest.approx(res.init_relative, rel=1e-6)
    else:
        assert res.final_relative < res.init_relative


@pytest.mark.parametrize("optimizer,iters,margin", [("paper", 200, 0.8), ("fast", 60, 0.25)])
def test_lowers_loss_well_below_nowag_p(optimizer: str, iters: int, margin: float) -> None:
    # Measured on this matrix: relative loss 0.0814 (NoWag-P) -> paper 200 its 0.0581 (x0.71), fast 60 its
    # 0.0126 (x0.15).
    w, h = _matrix(256, 256), _h(256)
    res = armor_prune(w, h, 32, 32, optimizer=optimizer, iters=iters, patience=iters, plateau=None)
    _check_guarantee(w, h, res)
    assert res.iterations == iters and res.stopped == "cap"
    assert res.final_relative < margin * res.init_relative


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_deterministic(optimizer: str) -> None:
    w, h = _matrix(32, 64, seed=7), _h(64)
    r1 = armor_prune(w, h, 16, 16, optimizer=optimizer, iters=12, seed=4)
    r2 = armor_prune(w, h, 16, 16, optimizer=optimizer, iters=12, seed=4)
    assert r1.history == r2.history
    assert torch.equal(r1.core, r2.core) and torch.equal(r1.mask, r2.mask)
    assert torch.equal(r1.a_blocks, r2.a_blocks) and torch.equal(r1.b_blocks, r2.b_blocks)


def test_paper_seed_changes_the_draws() -> None:
    w, h = _matrix(32, 64, seed=7), _h(64)
    r1 = armor_prune(w, h, 16, 16, optimizer="paper", iters=12, seed=1)
    r2 = armor_prune(w, h, 16, 16, optimizer="paper", iters=12, seed=2)
    assert not torch.equal(r1.core, r2.core)


def test_half_precision_input_is_fitted_in_float32() -> None:
    w, h = _matrix(32, 64, seed=2), _h(64)
    res = armor_prune(w.to(torch.bfloat16), h.to(torch.bfloat16), 16, 16, iters=5)
    assert res.core.dtype == res.a_blocks.dtype == res.b_blocks.dtype == torch.float32
    _check_guarantee(w.to(torch.bfloat16).float(), h.to(torch.bfloat16).float(), res)


def test_group_update_matches_brute_force() -> None:
    """solve_groups: best pattern and values equal a dense least-squares search over all 6 patterns."""
    g = torch.Generator().manual_seed(11)
    bo, bi = 4, 8
    wn = torch.randn(bo, bi, generator=g)
    h = torch.rand(bi, generator=g) + 0.5
    a = torch.eye(bo) + 0.3 * torch.randn(bo, bo, generator=g)
    b = torch.eye(bi) + 0.3 * torch.randn(bi, bi, generator=g)
    mask = nowag_p_mask(wn, h)
    c = wn * mask
    row, grp = 2, 1
    cols = slice(4 * grp, 4 * grp + 4)

    def loss(core: torch.Tensor) -> float:
        return float(((a @ core @ b - wn).square() * h).sum())

    best_loss, best_vals = float("inf"), None
    for keep in itertools.combinations(range(4), 2):
        idx = [4 * grp + k for k in keep]
        base = c.clone()
        base[row, cols] = 0
        r = (a @ base @ b - wn) * h.sqrt()
        design = torch.stack([torch.outer(a[:, row], b[j] * h.sqrt()).reshape(-1) for j in idx], 1)
        sol = torch.linalg.lstsq(design.double(), -r.reshape(-1, 1).double()).solution.float().squeeze(1)
        trial = base.clone()
        trial[row, idx] = sol
        if loss(trial) < best_loss:
            best_loss, best_vals = loss(trial), trial[row, cols].clone()

    q_full = a.T @ ((a @ c @ b - wn) * h) @ b.T
    gram = group_gram(b.unsqueeze(0), h)[grp : grp + 1]
    vals, keep, change = armor.solve_groups(
        q_full[row, cols].unsqueeze(0), c[row, cols].unsqueeze(0), gram, a[:, row].square().sum().unsqueeze(0)
    )
    assert int(keep.sum()) == 2
    torch.testing.assert_close(vals[0] * keep[0], best_vals, rtol=1e-3, atol=1e-4)
    assert loss(c) + float(change[0]) == pytest.approx(best_loss, rel=1e-4, abs=1e-5)


def test_bad_inputs_are_rejected() -> None:
    w, h = _matrix(32, 64), _h(64)
    with pytest.raises(ValueError, match="divide"):
        armor_prune(w, h, 5, 16)
    with pytest.raises(ValueError, match="h must"):
        armor_prune(w, h[:10], 16, 16)
    with pytest.raises(ValueError, match="multiple of 4"):
        armor_prune(torch.randn(8, 6), torch.ones(6), 2, 2)
    with pytest.raises(ValueError, match="optimizer"):
        armor_prune(w, h, 16, 16, optimizer="sgd")


def test_plateau_rule_on_a_history() -> None:
    rule = Plateau(window=3, tol=0.01)
    assert not rule.reached([1.0, 0.9, 0.8])  # shorter than the window
    assert not rule.reached([1.0, 0.9, 0.8, 0.7])  # 30% over the last 3
    assert rule.reached([1.0, 0.5, 0.499, 0.498, 0.4975])  # 0.3% over the last 3
    assert not rule.reached([1.0, 0.5, 0.499, 0.498, 0.40])


def test_fast_mode_stops_on_a_plateau() -> None:
    """The default stop ends the fast mode on a plateau before a high cap, close to the capped loss."""
    w, h = _matrix(64, 128, seed=11), _h(128)
    stopped = armor_prune(w, h, 16, 16, iters=2000)
    assert stopped.stopped == "plateau" and stopped.iterations < 2000
    window = DEFAULT_PLATEAU.window
    last = stopped.history[-1 - window:]
    assert last[0] - last[-1] < DEFAULT_PLATEAU.tol * last[0]  # it did stop on a plateau
    capped = armor_prune(w, h, 16, 16, iters=stopped.iterations + 40, plateau=None)
    assert capped.stopped == "cap" and capped.iterations == stopped.iterations + 40
    assert capped.history[: len(stopped.history)] == stopped.history  # same path up to the stop
    assert stopped.final_relative <= 1.05 * capped.final_relative


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_snapshots_are_the_shorter_runs(optimizer: str) -> None:
    """One long run watching shorter rules returns, for each, exactly the result of a run with that rule
    (bench/convergence_curve.py --one-run rests on this); a rule that never fires gets the final result."""
    w, h = _matrix(64, 128, seed=13), _h(128)
    rules = [Snapshot(4), Snapshot(25, Plateau(3, 0.06)), Snapshot(500)]
    long = armor_prune(w, h, 16, 16, optimizer=optimizer, iters=30, plateau=None, patience=10**6, snapshots=rules)
    assert [s.iterations for s in long.snapshots][0] == 4 and long.snapshots[2] is long
    for rule, snap in zip(rules[:2], long.snapshots, strict=False):
        alone = armor_prune(w, h, 16, 16, optimizer=optimizer, iters=rule.iters, plateau=rule.plateau,
                            patience=10**6)
        assert snap.iterations == alone.iterations and snap.stopped == alone.stopped
        assert snap.history == alone.history
        for name in ("a_blocks", "b_blocks", "core", "mask"):
            assert torch.equal(getattr(snap, name), getattr(alone, name)), name
    if optimizer == "fast":  # paper mode has no plateau rule: its second snapshot is the cap's
        assert long.snapshots[1].stopped == "plateau" and 4 < long.snapshots[1].iterations < 25
    with pytest.raises(ValueError, match="snapshots are not supported"):
        armor_prune(w, h, 16, 16, optimizer="fast-gram", iters=2, snapshots=rules)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_time_limit_ends_the_iterations_in_time(optimizer: str) -> None:
    w, h = _matrix(256, 512, seed=12), _h(512)
    res = armor_prune(w, h, 32, 32, optimizer=optimizer, iters=10**6, plateau=None, patience=10**6, time_limit=0.5)
    assert res.stopped == "time_limit" and res.iterations >= 1
    per_iter = res.elapsed[-1] - res.elapsed[-2]
    assert res.elapsed[-1] <= 0.5 + per_iter  # stops before an iteration that would end past the limit
    none = armor_prune(w, h, 32, 32, optimizer=optimizer, iters=10, time_limit=0.0)
    assert none.iterations == 0 and none.stopped == "time_limit"
    _check_guarantee(w, h, none)


def test_config_and_keyword_forms_agree() -> None:
    """armor_prune(..., ArmorConfig(...)) and armor_prune(..., field=value) are the same run; a field that does not
    exist is refused."""
    w, h = _matrix(32, 64, seed=5), _h(64)
    cfg = armor.ArmorConfig(optimizer="paper", iters=6, seed=2)
    by_config = armor_prune(w, h, 16, 16, cfg)
    by_keywords = armor_prune(w, h, 16, 16, optimizer="paper", iters=6, seed=2)
    changed = armor_prune(w, h, 16, 16, cfg, seed=3)
    assert by_config.history == by_keywords.history and torch.equal(by_config.core, by_keywords.core)
    assert changed.history != by_config.history  # the keyword changes the config's seed
    with pytest.raises(TypeError):
        armor_prune(w, h, 16, 16, optimiser="fast")


def test_registry_finds_the_armor_package() -> None:
    from offline_prune.methods import get_method

    assert hasattr(armor, "__path__")  # a package, found by the registry like a module
    assert get_method("armor") is armor.METHOD
