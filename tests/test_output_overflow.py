"""A layer whose values are all finite, and so is A @ core @ B, but whose output overflows the serving dtype for inputs
of the size a model's own activations reach (docs/FORMAT.md, Validation step 6, `ACTIVATION_BOUND`). Unchecked, such
a checkpoint serves NaN logits; every reader refuses it at load naming the tensor: here the offline reader and the
stage checks on their own, and (kind ``output_overflow`` of tests/armor_fixtures.py) armor-eval
(tests/test_bad_checkpoints.py), armor-check (tests/test_check.py) and vLLM start-up (tests/test_malformed.py)."""

from __future__ import annotations

import armor_fixtures as af
import pytest
import torch

from offline_prune.checkpoint import load_model
from vllm_armor import checkpoint_format as fmt
from vllm_armor.checkpoint_format import numerics

MODULE = f"{af.L0}.mlp.down_proj"


def test_finite_values_that_overflow_the_output_serve_nan_unless_refused(armor_tiny_llama, tmp_path, monkeypatch):
    folder = af.make_malformed(armor_tiny_llama[0], tmp_path / "bad", "output_overflow")
    _, tensors = fmt.read_folder(folder)
    layer = fmt.linear_tensors(tensors, MODULE)
    assert all(bool(t.isfinite().all()) for t in layer.values())
    assert bool(fmt.reconstruct_weight(layer, torch.bfloat16).isfinite().all())  # W_hat itself fits bfloat16
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with monkeypatch.context() as m:  # the premise: without the output check the model computes Inf/NaN
        m.setattr(numerics, "check_outputs", lambda *args, **kwargs: None)
        logits = load_model(folder, dtype=torch.bfloat16)(ids, use_cache=False).logits
    assert not bool(logits.isfinite().all())
    with pytest.raises(fmt.ArmorFormatError, match=af.MALFORMED["output_overflow"]):
        load_model(folder, dtype=torch.bfloat16)
    with pytest.raises(fmt.ArmorFormatError, match=af.MALFORMED["output_overflow"]):
        load_model(folder, dtype=torch.float32)  # the model dtype (bfloat16) is checked whatever the compute dtype


def _layer(ab: bool = True) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return af.armorize_linear(torch.randn(32, 64, generator=gen) * 0.05, 16 if ab else None, gen)


def test_the_stage_that_overflows_first_is_named():
    big = torch.finfo(torch.bfloat16).max / fmt.ACTIVATION_BOUND  # finite, but times the bound it is not
    fmt.check_outputs("m", _layer(), torch.bfloat16)
    t = _layer()
    t[fmt.ARMOR_B] = t[fmt.ARMOR_B] * (2 * big / t[fmt.ARMOR_B].abs().max())
    with pytest.raises(fmt.ArmorFormatError, match=r"'m.armor_b': the layer's output overflows .* B has entries"):
        fmt.check_outputs("m", t, torch.bfloat16)
    t = _layer()
    t[fmt.ARMOR_A] = t[fmt.ARMOR_A] * 1e37
    with pytest.raises(fmt.ArmorFormatError, match=r"'m.armor_a': .* A @ core @ B has entries up to"):
        fmt.check_outputs("m", t, torch.bfloat16)
    t = _layer(ab=False)
    half = torch.finfo(torch.float16).max / fmt.ACTIVATION_BOUND  # 16
    t[fmt.CORE_VALUES] = t[fmt.CORE_VALUES] * (2 * half / t[fmt.CORE_VALUES].abs().max())
    with pytest.raises(fmt.ArmorFormatError, match=r"'m.core_values': .* overflows torch.float16 .* the core has"):
        fmt.check_outputs("m", t, torch.float16)
    fmt.check_outputs("m", t, torch.bfloat16)  # the same values fit bfloat16's range


def test_bound_is_exact_not_pessimistic():
    # scaled so that the cheap bound (row sums) overflows float16 for the bound's input, while the product does not
    t = _layer()
    limit = torch.finfo(torch.float16).max / fmt.ACTIVATION_BOUND
    t[fmt.ARMOR_A] = t[fmt.ARMOR_A] * (2 * limit / fmt.reconstruction_bound(t))
    assert fmt.reconstruction_bound(t) > limit > fmt.reconstruct_weight(t, torch.float64).abs().max()
    fmt.check_outputs("m", t, torch.float16)
    # a real model's largest weight (SmolLM2-135M: 9.25) may be served in float16
    dense = torch.zeros(8, 16)
    dense[0, 0] = 9.25
    mask = torch.zeros(8, 16, dtype=torch.bool)
    mask.view(8, 4, 4)[..., :2] = True
    fmt.check_outputs("m", fmt.encode_linear(dense, mask), torch.float16)
