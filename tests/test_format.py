"""Checkpoint format v1: 2:4 packing round trip, validation errors, block-size rule, quant config."""

from __future__ import annotations

import argparse

import pytest
import torch

from offline_prune.errors import UserError
from offline_prune.methods.armor import ab_overhead, auto_block_sizes, block_size_arg, largest_block_size
from offline_prune.proxy import top2_of_4_mask
from vllm_armor import checkpoint_format as fmt
from vllm_armor.blockdiag import blockdiag_dense


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
    with pytest.raises(fmt.ArmorFormatError, match=r"core_meta': expected shape \(8, 4\) for a 8x32.*8x16 weight"):
        fmt.validate_linear("x", _tensors(), expected_shape=(8, 32))


def test_largest_block_size_rule():
    assert largest_block_size(576, 128) == 96
    assert largest_block_size(192, 128) == 96
    assert largest_block_size(1536, 128) == 128
    assert largest_block_size(576, 32) == 32
    with pytest.raises(UserError, match="no divisor that is a multiple of 4"):
        largest_block_size(6, 128)


SMOLLM2 = {(576, 576): (16, 16), (192, 576): (8, 8), (1536, 576): (24, 24), (576, 1536): (24, 24)}
LLAMA2_7B = {(4096, 4096): (128, 128), (11008, 4096): (172, 128), (4096, 11008): (128, 172)}


@pytest.mark.parametrize("shape,blocks", [*SMOLLM2.items(), *LLAMA2_7B.items()])
def test_auto_block_size_keeps_the_overhead_budget(shape, blocks):
    d_out, d_in = shape
    assert auto_block_sizes(d_out, d_in, 0.125) == blocks
    assert ab_overhead(d_out, d_in, *blocks) <= 0.125
    # the largest such size: one step up in either dimension breaks the budget or the tiling
    bo, bi = blocks
    for up in range(max(bo, bi) + 1, max(bo, bi) + 64):
        if d_out % up == 0 and d_in % up == 0 and up % 4 == 0:
            assert ab_overhead(d_out, d_in, up, up) > 0.125
    # a bigger budget never gives smaller blocks; every size divides its dimension
    last = (0, 0)
    for budget in (0.03, 0.06, 0.125, 0.25, 0.5):
        bo, bi = auto_block_sizes(d_out, d_in, budget)
        assert d_out % bo == 0 and d_in % bi == 0 and ab_overhead(d_out, d_in, bo, bi) <= budget
        assert (bo, bi) >= last
        last = (bo, bi)


def test_block_size_flag_and_budget_errors():
    assert block_size_arg("auto") == "auto" and block_size_arg("AUTO") == "auto" and block_size_arg("96") == 96
    with pytest.raises(argparse.ArgumentTypeError, match="must be 'auto' or an integer"):
        block_size_arg("big")
    with pytest.raises(UserError, match="--max-overhead must be positive"):
        auto_block_sizes(576, 576, 0)
    with pytest.raises(UserError, match="even diagonal A and B"):
        auto_block_sizes(576, 576, 1e-4)


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
    expected = blockdiag_dense(t[fmt.ARMOR_A]) @ core @ blockdiag_dense(t[fmt.ARMOR_B])
    torch.testing.assert_close(fmt.reconstruct_weight(t), expected)


def test_expected_shapes_are_what_validation_and_headers_check():
    t = _tensors()
    shapes = fmt.expected_shapes(8, 16, 4, 8)
    assert shapes == {k: tuple(v.shape) for k, v in t.items()}
    assert fmt.check_shapes("m", shapes, d_out=8, d_in=16) == fmt.validate_linear("m", t)
    bad = {**shapes, fmt.CORE_META: (8, 2, 1)}
    with pytest.raises(fmt.ArmorFormatError, match=r"'m\.core_meta': expected a 2-D tensor"):
        fmt.check_shapes("m", bad)
    with pytest.raises(fmt.ArmorFormatError, match=r"'m\.core_meta': expected shape \(8, 4\) for a 8x32 layer"):
        fmt.check_shapes("m", shapes, d_in=32)


def test_encode_decode_round_trip():
    core, mask = random_2of4(8, 16)
    a, b = torch.randn(2, 4, 4, dtype=torch.float64), torch.randn(2, 8, 8, dtype=torch.float64)
    t = fmt.encode_linear(core, mask, a, b)
    assert t[fmt.ARMOR_A].dtype == torch.float32 and t[fmt.CORE_META].dtype == torch.uint8
    lin = fmt.decode_linear(t, torch.float64)
    assert torch.equal(lin.core, (core * mask).double()) and torch.equal(lin.a_blocks, a.float().double())
    assert fmt.ARMOR_A not in fmt.encode_linear(core, mask)
    with pytest.raises(fmt.ArmorFormatError, match="A and B come together"):
        fmt.encode_linear(core, mask, a, None)


@pytest.mark.parametrize("max_shard_bytes", [fmt.MAX_SHARD_BYTES, 600])
def test_write_then_read_folder(tmp_path, max_shard_bytes):
    t = {fmt.tensor_name("m", k): v for k, v in _tensors().items()}
    t["m.bias"] = torch.randn(8, dtype=torch.bfloat16)
    config = {"quantization_config": fmt.make_quant_config("armor", 4, ["m"]), "dtype": "bfloat16"}
    fmt.write_folder(tmp_path, t, config, max_shard_bytes=max_shard_bytes)
    assert (tmp_path / fmt.INDEX_FILE).exists() == (max_shard_bytes == 600)
    read_config, tensors = fmt.read_folder(tmp_path)
    assert read_config == config and tensors.keys() == t.keys()
    assert all(torch.equal(tensors[k], v) for k, v in t.items())
    assert {k: (v.shape, v.dtype) for k, v in fmt.read_headers(tmp_path).items()} == {
        k: (tuple(v.shape), v.dtype) for k, v in t.items()}
    assert fmt.linear_tensors(tensors, "m").keys() == set(fmt.TENSOR_SUFFIXES)


def test_read_folder_names_what_is_missing(tmp_path):
    with pytest.raises(fmt.ArmorFormatError, match="no config.json"):
        fmt.read_folder(tmp_path)
    (tmp_path / fmt.CONFIG_FILE).write_text("{}")
    with pytest.raises(fmt.ArmorFormatError, match=r"has no \*\.safetensors"):
        fmt.read_folder(tmp_path)


def test_checkpoint_index_reads_checks_renames(tmp_path):
    core, mask = random_2of4(8, 16)
    tensors = {f"m.l.{s}": t for s, t in fmt.encode_linear(core.bfloat16(), mask).items()}
    tensors["m.l.core_values"] = tensors["m.l.core_values"].bfloat16()
    fmt.write_folder(tmp_path, tensors, {"dtype": "bfloat16", "quantization_config": fmt.make_quant_config(
        "magnitude", None, ["m.l"])})
    index = fmt.CheckpointIndex.read(tmp_path, ["m.l"])
    assert index.model_dtype == torch.bfloat16 and index.shapes("m.l", 16).d_out == 8
    assert set(index.headers("m.l")) == {fmt.CORE_VALUES, fmt.CORE_META}
    index.check_loaded("m.l", fmt.CORE_VALUES, tensors["m.l.core_values"], into=torch.bfloat16)
    with pytest.raises(fmt.ArmorFormatError, match=r"'m.l.core_values': stored as torch.bfloat16, loaded as "
                                                   r"torch.float32 into a torch.float32 parameter"):
        index.check_loaded("m.l", fmt.CORE_VALUES, tensors["m.l.core_values"].float(), into=torch.float32)
    with pytest.raises(fmt.ArmorFormatError, match=r"'m.l.core_meta': expected shape \(8, 2\), got \(8, 1\)"):
        index.check_loaded("m.l", fmt.CORE_META, tensors["m.l.core_meta"][:, :1])
    with pytest.raises(fmt.ArmorFormatError, match=r"'m.l.core_meta': was not loaded"):
        index.check_loaded("m.l", fmt.CORE_META, torch.empty(8, 2, dtype=torch.uint8, device="meta"))
    with pytest.raises(fmt.ArmorFormatError, match=r"pruned module 'm.l' .* is not a linear layer"):
        index.check_served(["m.other"])
    renamed = index.renamed(lambda n: n.replace("m.", "model."), lambda names: [n.replace("m.", "model.")
                                                                                 for n in names])
    assert renamed.pruned_modules == {"model.l"} and renamed.values_dtype("model.l") == torch.bfloat16
    assert index.pruned_modules == {"m.l"}  # the index is immutable: renaming made a new one
    with pytest.raises(fmt.ArmorFormatError, match=r"'m.x.core_values' is missing"):  # checked when read
        fmt.CheckpointIndex.read(tmp_path, ["m.l", "m.x"])


def test_linear_method_depends_on_the_index_not_on_the_plugin():
    import ast
    from pathlib import Path

    source = Path(fmt.__file__).parents[1] / "linear_method.py"
    imports = {n.module for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.ImportFrom)}
    assert "vllm_armor.plugin" not in imports and "self.config" not in source.read_text()
