"""Checkpoint format v1: 2:4 packing round trip, validation errors, block-size rule, quant config."""

from __future__ import annotations

import pytest
import torch

from offline_prune.proxy import top2_of_4_mask
from vllm_armor import checkpoint_format as fmt


def random_2of4(d_out: int, d_in: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g)
    mask = top2_of_4_mask(torch.rand(d_out, d_in, generator=g))
    return w * mask, mask


def test_pack_unpack_round_trip():
    core, mask = random_2of4(6, 32)
    values, meta = fmt.pack_2to4(core, mask)
    assert values.shape == (6, 16) and meta.shape == (6, 4) and meta.dtype == torch.uint8
    assert torch.equal(fmt.unpack_mask(meta), mask)
    assert torch.equal(fmt.unpack_2to4(values, meta), core)


def test_pack_layout_by_hand():
    # row 0: group 0 keeps inputs 1 and 3 (0b1010), group 1 keeps inputs 4 and 5 (0b0011)
    mask = torch.tensor([[0, 1, 0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    core = torch.tensor([[0.0, 2.0, 0.0, 3.0, 4.0, 5.0, 0.0, 0.0]])
    values, meta = fmt.pack_2to4(core, mask)
    assert values.tolist() == [[2.0, 3.0, 4.0, 5.0]]
    assert meta.tolist() == [[0b1010 | (0b0011 << 4)]]


def test_kept_zero_value_stays_in_mask():
    core, mask = random_2of4(2, 8)
    core[0, mask[0].nonzero()[0]] = 0.0
    values, meta = fmt.pack_2to4(core, mask)
    assert torch.equal(fmt.unpack_mask(meta), mask)


def _tensors(d_out=8, d_in=16, bs_out=4, bs_in=8, ab=True):
    core, mask = random_2of4(d_out, d_in)
    values, meta = fmt.pack_2to4(core, mask)
    t = {fmt.CORE_VALUES: values, fmt.CORE_META: meta}
    if ab:
        t[fmt.ARMOR_A] = torch.randn(d_out // bs_out, bs_out, bs_out)
        t[fmt.ARMOR_B] = torch.randn(d_in // bs_in, bs_in, bs_in)
    return t


def test_validate_good_linear():
    shapes = fmt.validate_linear("m", _tensors(), expected_shape=(8, 16))
    assert (shapes.d_out, shapes.d_in, shapes.block_out, shapes.block_in) == (8, 16, 4, 8)
    assert not fmt.validate_linear("m", _tensors(ab=False)).has_ab


@pytest.mark.parametrize("nibble,kept", [(0b0111, 3), (0b0001, 1), (0b0000, 0), (0b1111, 4)])
def test_validate_rejects_bad_meta(nibble, kept):
    t = _tensors()
    t[fmt.CORE_META][2, 1] = (t[fmt.CORE_META][2, 1] & 0xF0) | nibble
    with pytest.raises(fmt.ArmorFormatError, match=rf"layer\.core_meta.*row 2, group 2 keeps {kept} of 4"):
        fmt.validate_linear("layer", t)


def test_validate_rejects_nan_and_shapes_and_missing():
    t = _tensors()
    t[fmt.CORE_VALUES][0, 0] = float("nan")
    with pytest.raises(fmt.ArmorFormatError, match=r"'x\.core_values': contains NaN"):
        fmt.validate_linear("x", t)
    t = _tensors()
    t[fmt.ARMOR_B] = torch.randn(3, 5, 5)
    with pytest.raises(fmt.ArmorFormatError, match=r"'x\.armor_b'.*do not cover the input dimension 16"):
        fmt.validate_linear("x", t)
    t = _tensors()
    del t[fmt.ARMOR_A]
    with pytest.raises(fmt.ArmorFormatError, match=r"'x\.armor_a' is missing"):
        fmt.validate_linear("x", t)
    t = _tensors()
    del t[fmt.CORE_VALUES]
    with pytest.raises(fmt.ArmorFormatError, match=r"'x\.core_values' is missing"):
        fmt.validate_linear("x", t)
    with pytest.raises(fmt.ArmorFormatError, match="describes a 8x16 weight, the layer is 8x32"):
        fmt.validate_linear("x", _tensors(), expected_shape=(8, 32))


def test_largest_block_size_rule():
    assert fmt.largest_block_size(576, 128) == 96
    assert fmt.largest_block_size(192, 128) == 96
    assert fmt.largest_block_size(1536, 128) == 128
    assert fmt.largest_block_size(576, 32) == 32
    with pytest.raises(fmt.ArmorFormatError):
        fmt.largest_block_size(6, 128)


def test_quant_config_validation():
    good = fmt.make_quant_config("armor", 128, ["b", "a"])
    assert fmt.validate_quant_config(good)["pruned_modules"] == ["a", "b"]
    with pytest.raises(fmt.ArmorFormatError, match="format_version 2 is not supported"):
        fmt.validate_quant_config({**good, "format_version": 2})
    with pytest.raises(fmt.ArmorFormatError, match=r"unknown keys \['bits'\]"):
        fmt.validate_quant_config({**good, "bits": 4})
    with pytest.raises(fmt.ArmorFormatError, match="sparsity '4:8'"):
        fmt.validate_quant_config({**good, "sparsity": "4:8"})


def test_reconstruct_matches_block_diag_product():
    t = _tensors()
    core = fmt.unpack_2to4(t[fmt.CORE_VALUES], t[fmt.CORE_META])
    expected = fmt.block_diag_dense(t[fmt.ARMOR_A]) @ core @ fmt.block_diag_dense(t[fmt.ARMOR_B])
    torch.testing.assert_close(fmt.reconstruct_weight(t), expected)
