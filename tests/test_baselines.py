"""Per-matrix baseline pruners: hand-computed masks, 2:4 validity, SparseGPT's OBS math and its error."""

from __future__ import annotations

import logging

import pytest
import torch

from offline_prune.methods.magnitude import magnitude_2of4
from offline_prune.methods.nowag_p import nowag_p_2of4
from offline_prune.methods.sparsegpt import sparsegpt_2of4
from offline_prune.methods.wanda import wanda_2of4

# Row 0 / row 1 of a 2x8 weight; groups are columns 0-3 and 4-7.
W = torch.tensor([
    [3.0, 1.0, 2.0, 0.5, 1.0, 2.0, 3.0, 4.0],
    [4.0, 0.1, 0.0, 1.0, 1.0, 2.0, 3.0, 4.0],
])
H = torch.tensor([1.0, 1.0, 1.0, 1.0, 16.0, 9.0, 4.0, 1.0])


def mask_of(rows):
    return torch.tensor(rows, dtype=torch.bool)


def assert_2of4(w_hat, mask, weight=None):
    assert w_hat.dtype == torch.float32 and mask.dtype == torch.bool
    assert w_hat.shape == mask.shape
    assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all()
    assert (w_hat[~mask] == 0).all()
    if weight is not None:
        assert torch.equal(w_hat[mask], weight.float()[mask])


def layer_error(x, weight, w_hat):
    return (x @ weight.float().T - x @ w_hat.T).norm().item()


def correlated_inputs(n, d_in, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) / d_in**0.5 + torch.eye(d_in)
    scale = torch.rand(d_in, generator=g) * 2 + 0.1
    return (torch.randn(n, d_in, generator=g) @ mix) * scale


def test_magnitude_by_hand():
    w_hat, mask = magnitude_2of4(W)
    # |W| row 0: (3, 1, 2, .5) -> cols 0, 2; (1, 2, 3, 4) -> cols 6, 7. Row 1: (4, .1, 0, 1) -> 0, 3.
    assert torch.equal(mask, mask_of([[1, 0, 1, 0, 0, 0, 1, 1], [1, 0, 0, 1, 0, 0, 1, 1]]))
    assert_2of4(w_hat, mask, W)


def test_wanda_by_hand():
    # Group 1 has h = 1: same as magnitude (cols 0, 2 / 0, 3). Group 2, sqrt(h) = (4, sqrt(9.5), 2, 1):
    # scores (4, 2*3.08=6.16, 6, 4) -> cols 5, 6 in both rows (magnitude keeps 6, 7).
    h = H.clone()
    h[5] = 9.5
    w_hat, mask = wanda_2of4(W, h)
    assert torch.equal(mask, mask_of([[1, 0, 1, 0, 0, 1, 1, 0], [1, 0, 0, 1, 0, 1, 1, 0]]))
    assert_2of4(w_hat, mask, W)
    # A loud input wins over a large weight: h_1 = 100 -> row 0 scores (3, 10, 2, .5) keep cols 0, 1.
    h[1] = 100.0
    assert mask_of([1, 1, 0, 0]).equal(wanda_2of4(W, h)[1][0, :4])


def test_nowag_p_by_hand():
    w_hat, mask = nowag_p_2of4(W, H)
    # Column norms c = (5, 1.005, 2, 1.118, sqrt2, 2 sqrt2, 3 sqrt2, 4 sqrt2); the row scaling does not change
    # the ranking within a row, so the scores are (W_ij / c_j)^2 h_j:
    #   row 0 group 1: (.36, .99, 1, .2) -> cols 1, 2   (magnitude would keep 0, 2)
    #   row 1 group 1: (.64, .0099, 0, .8) -> cols 0, 3
    #   group 2, both rows: (W/c)^2 = 1/2 everywhere, times h = (16, 9, 4, 1) -> cols 4, 5
    assert torch.equal(mask, mask_of([[0, 1, 1, 0, 1, 1, 0, 0], [1, 0, 0, 1, 1, 1, 0, 0]]))
    assert_2of4(w_hat, mask, W)


def test_sparsegpt_diagonal_hessian_by_hand():
    # A diagonal H gives a diagonal U with d_j^2 = 1 / (H_jj + damp): no compensation, values unchanged, and
    # the saliency is w^2 (H_jj + damp), i.e. Wanda's mask up to the damping.
    hess = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0, 16.0, 9.5, 4.0, 1.0]))
    w_hat, mask = sparsegpt_2of4(W, hess, percdamp=1e-6)
    assert torch.equal(mask, mask_of([[1, 0, 1, 0, 0, 1, 1, 0], [1, 0, 0, 1, 0, 1, 1, 0]]))
    torch.testing.assert_close(w_hat, W * mask)


def test_sparsegpt_compensation_by_hand():
    # Inputs 0 and 2 are correlated (H_02 = 1), the others independent.
    hess = torch.tensor([
        [2.0, 0.0, 1.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
        [1.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ])
    w = torch.tensor([[0.1, 0.2, 3.0, 4.0], [3.0, 4.0, 0.1, 0.2]])
    w_hat, mask = sparsegpt_2of4(w, hess, percdamp=1e-7)
    assert torch.equal(mask, mask_of([[0, 0, 1, 1], [1, 1, 0, 0]]))
    # Row 0 prunes inputs 0, 1, which come before the kept 2, 3: the kept weights become the least-squares
    # optimum w_S + H_SS^-1 H_SP w_P = (3, 4) + I^-1 [[1, 0], [0, 0]] (.1, .2) = (3.1, 4).
    # Row 1 prunes inputs 2, 3, after the kept ones: nothing left to compensate, kept values unchanged.
    torch.testing.assert_close(w_hat, torch.tensor([[0.0, 0.0, 3.1, 4.0], [3.0, 4.0, 0.0, 0.0]]),
                               atol=1e-5, rtol=0)


def naive_sparsegpt(weight, hess, percdamp):
    """Unblocked OBS with explicit inverses of the trailing Hessians (the paper's definition)."""
    w = weight.double().clone()
    h = hess.double().clone()
    n = h.shape[0]
    h += percdamp * h.diagonal().mean() * torch.eye(n, dtype=h.dtype)
    inv = [torch.linalg.inv(h[j:, j:]) for j in range(n)]
    mask = torch.zeros(w.shape, dtype=torch.bool)
    for j in range(n):
        if j % 4 == 0:
            d2 = torch.tensor([inv[j + k][0, 0] for k in range(4)], dtype=h.dtype)
            score = w[:, j:j + 4].square() / d2
            mask[:, j:j + 4].scatter_(1, score.topk(2, dim=1).indices, True)
        e = w[:, j] * ~mask[:, j]
        w[:, j:] -= e[:, None] / inv[j][0, 0] * inv[j][None, 0, :]
    return (w * mask).float(), mask


def test_sparsegpt_matches_unblocked_obs_for_any_blocksize():
    g = torch.Generator().manual_seed(0)
    x = correlated_inputs(64, 16, seed=1)
    hess = x.T @ x
    w = torch.randn(5, 16, generator=g)
    ref_hat, ref_mask = naive_sparsegpt(w, hess, 0.01)
    for bs in (4, 8, 12, 128):
        w_hat, mask = sparsegpt_2of4(w, hess, blocksize=bs)
        assert torch.equal(mask, ref_mask), bs
        torch.testing.assert_close(w_hat, ref_hat, atol=1e-4, rtol=1e-4)
        assert_2of4(w_hat, mask)


def test_all_methods_valid_2of4_on_random():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 64, generator=g)
    x = correlated_inputs(128, 64, seed=3)
    h = x.square().sum(0)
    for fn in (lambda: magnitude_2of4(w), lambda: wanda_2of4(w, h), lambda: nowag_p_2of4(w, h)):
        assert_2of4(*fn(), w)
    assert_2of4(*sparsegpt_2of4(w, x.T @ x, blocksize=16))


def test_sparsegpt_beats_magnitude_and_wanda_on_correlated_inputs():
    g = torch.Generator().manual_seed(4)
    d_out, d_in = 48, 96
    x = correlated_inputs(512, d_in, seed=5)
    w = torch.randn(d_out, d_in, generator=g)
    hess = x.T @ x
    err = {
        "magnitude": layer_error(x, w, magnitude_2of4(w)[0]),
        "wanda": layer_error(x, w, wanda_2of4(w, hess.diagonal())[0]),
        "nowag-p": layer_error(x, w, nowag_p_2of4(w, hess.diagonal())[0]),
        "sparsegpt": layer_error(x, w, sparsegpt_2of4(w, hess, blocksize=32)[0]),
    }
    assert err["sparsegpt"] < 0.9 * min(err["magnitude"], err["wanda"]), err


def test_sparsegpt_beats_magnitude_on_tiny_llama_layer():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    captured = {}
    layers = model.model.layers
    hooks = [
        layers[1].self_attn.q_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("q", i[0])),
        layers[1].mlp.down_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("down", i[0])),
    ]
    with torch.no_grad():
        model(torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1)))
    for hk in hooks:
        hk.remove()
    for name, lin in (("q", layers[1].self_attn.q_proj), ("down", layers[1].mlp.down_proj)):
        x = captured[name].reshape(-1, lin.in_features).float()
        w = lin.weight.detach()
        hess = x.T @ x
        e_mag = layer_error(x, w, magnitude_2of4(w)[0])
        e_wanda = layer_error(x, w, wanda_2of4(w, hess.diagonal())[0])
        e_sgpt = layer_error(x, w, sparsegpt_2of4(w, hess)[0])
        assert e_sgpt < e_mag and e_sgpt < e_wanda, (name, e_sgpt, e_mag, e_wanda)


def test_sparsegpt_dead_inputs():
    g = torch.Generator().manual_seed(6)
    x = correlated_inputs(256, 32, seed=7)
    dead = torch.tensor([1, 2, 9, 30])
    x[:, dead] = 0
    w = torch.randn(8, 32, generator=g)
    hess = x.T @ x
    w_hat, mask = sparsegpt_2of4(w, hess, blocksize=8)
    assert_2of4(w_hat, mask)
    assert torch.isfinite(w_hat).all()
    assert (w_hat[:, dead] == 0).all()
    assert layer_error(x, w, w_hat) < layer_error(x, w, wanda_2of4(w, hess.diagonal())[0])
    # Wanda and NoWag-P with dead inputs also stay finite and valid.
    for fn in (wanda_2of4, nowag_p_2of4):
        assert_2of4(*fn(w, hess.diagonal()), w)
    # A group of 4 dead inputs and an all-zero Hessian are accepted too.
    x[:, 4:8] = 0
    assert_2of4(*sparsegpt_2of4(w, x.T @ x))
    assert_2of4(*sparsegpt_2of4(w, torch.zeros(32, 32)))


def test_bf16_inputs_give_float32():
    g = torch.Generator().manual_seed(8)
    w = torch.randn(8, 16, generator=g).bfloat16()
    x = correlated_inputs(64, 16, seed=9)
    hess = x.T @ x
    h = hess.diagonal()
    cases = [
        (magnitude_2of4(w), magnitude_2of4(w.float())),
        (wanda_2of4(w, h.bfloat16()), wanda_2of4(w.float(), h.bfloat16().float())),
        (nowag_p_2of4(w, h.bfloat16()), nowag_p_2of4(w.float(), h.bfloat16().float())),
        (sparsegpt_2of4(w, hess.bfloat16()), sparsegpt_2of4(w.float(), hess.bfloat16().float())),
    ]
    for (w_hat, mask), (ref_hat, ref_mask) in cases:
        assert w_hat.dtype == torch.float32
        assert torch.equal(mask, ref_mask)
        torch.testing.assert_close(w_hat, ref_hat)


def test_sparsegpt_bad_hessian(caplog):
    w = torch.ones(2, 4)
    # Slightly indefinite: the default dampening is not enough, ten times more is (logged).
    with caplog.at_level(logging.WARNING, logger="offline_prune.methods.sparsegpt"):
        assert_2of4(*sparsegpt_2of4(w, torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.05]))))
    assert "dampening" in caplog.text
    with pytest.raises(ValueError, match="not positive definite"):
        sparsegpt_2of4(w, -torch.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        sparsegpt_2of4(w, torch.full((4, 4), float("nan")))
    with pytest.raises(ValueError, match="d_in divisible by 4"):
        magnitude_2of4(torch.ones(2, 6))
    with pytest.raises(ValueError, match="blocksize"):
        sparsegpt_2of4(torch.ones(2, 8), torch.eye(8), blocksize=6)
