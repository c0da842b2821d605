"""Fast unit tests: quantization_config validation, sharding rules, kernel selection, custom ops,
registration. No server."""

from __future__ import annotations

import subprocess
import sys

import armor_fixtures as af
import pytest
import torch

from offline_prune.methods.armor import largest_block_size
from vllm_armor import checkpoint_format as cf
from vllm_armor.blockdiag import blockdiag_dense
from vllm_armor.checkpoint_format import ArmorFormatError
from vllm_armor.kernels import KERNELS, LayerSpec, choose_kernel, factored_forward
from vllm_armor.kernels.dense import DenseFoldKernel
from vllm_armor.kernels.factored import FactoredKernel, factored_linear
from vllm_armor.kernels.sparse24 import Sparse24Kernel
from vllm_armor.tensor_parallel import check_input_shard, check_output_shard

GOOD = cf.make_quant_config("armor", 64, ["model.layers.0.self_attn.q_proj"])


@pytest.fixture(scope="module")
def armor_config_cls():
    import vllm_armor

    vllm_armor.register()
    from vllm_armor.plugin import ArmorConfig

    return ArmorConfig


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format_version": 2}, "format_version 2 is not supported"),
        ({"sparsity": "4:8"}, "sparsity '4:8' is not supported"),
        ({"extra_key": 1}, "unknown keys ['extra_key']"),
        ({"pruned_modules": "model.layers.0"}, "pruned_modules must be a list"),
    ],
)
def test_from_config_rejects(armor_config_cls, change, message):
    with pytest.raises(ArmorFormatError) as err:
        armor_config_cls.from_config({**GOOD, **change})
    assert message in str(err.value)


def test_from_config_missing_key(armor_config_cls):
    cfg = dict(GOOD)
    del cfg["sparsity"]
    with pytest.raises(ArmorFormatError, match=r"missing keys \['sparsity'\]"):
        armor_config_cls.from_config(cfg)


def test_from_config_accepts_and_registers(armor_config_cls):
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    cfg = armor_config_cls.from_config(GOOD)
    assert cfg.pruned_modules == {"model.layers.0.self_attn.q_proj"}
    assert "armor" in QUANTIZATION_METHODS and get_quantization_config("armor") is armor_config_cls
    import vllm_armor

    vllm_armor.register()  # idempotent
    assert QUANTIZATION_METHODS.count("armor") == 1


def test_package_import_does_not_import_vllm():
    code = ("import sys, vllm_armor, vllm_armor.kernels, vllm_armor.checkpoint_format, vllm_armor.tensor_parallel; "
            "import offline_prune.checkpoint; print('vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_kernel_env_is_part_of_compile_cache_key(armor_config_cls, monkeypatch):
    import vllm.envs as envs

    monkeypatch.setenv("VLLM_ARMOR_KERNEL", "dense")
    dense = envs.compile_factors()
    monkeypatch.setenv("VLLM_ARMOR_KERNEL", "factored")
    factored = envs.compile_factors()
    assert dense["VLLM_ARMOR_KERNEL"] == "dense" and factored["VLLM_ARMOR_KERNEL"] == "factored"
    # under auto on CPU the key says whether the CPU 2:4 kernel (another traced graph) is available
    from vllm_armor.kernels.sparse24_cpu import available

    monkeypatch.delenv("VLLM_ARMOR_KERNEL")
    auto = envs.compile_factors()["VLLM_ARMOR_KERNEL"]
    assert auto == ("auto+sparse24_cpu" if available()[0] else "auto")


# -- sharding rules -------------------------------------------------------------------------------


def test_output_shard_must_hold_whole_a_blocks():
    check_output_shard("m.q_proj", 128, 64)
    check_output_shard("m.q_proj", 128, None)
    with pytest.raises(ArmorFormatError, match=r"'m.q_proj.armor_a'.*192 output rows.*A block of size 128"):
        check_output_shard("m.q_proj", 192, 128)


def test_kv_replication_needs_block_dividing_head_dim():
    # SmolLM2 (head_dim 64, 3 kv heads) at TP=9: each rank holds one kv head of 64 rows.
    with pytest.raises(ArmorFormatError, match="64 output rows, which would split an A block of size 96"):
        check_output_shard("m.k_proj", 64, 96)


def test_input_shard_must_hold_whole_b_blocks_and_meta_bytes():
    check_input_shard("m.o_proj", 256, 128)
    with pytest.raises(ArmorFormatError, match=r"'m.o_proj.armor_b'.*192 input columns.*B block of size 128"):
        check_input_shard("m.o_proj", 192, 128)
    with pytest.raises(ArmorFormatError, match=r"'m.o_proj.core_meta'.*12 input columns.*group of 4"):
        check_input_shard("m.o_proj", 12, None)


def test_smollm2_tp3_is_allowed():
    # SmolLM2-135M at TP=3, requested block 128: q 576/3=192 rows vs A block 96 -> ok; k/v 192/3=64 rows
    # vs block 96 -> refused (the pruner's 96 does not divide 64): the rule a user sees.
    check_output_shard("q", 576 // 3, largest_block_size(576, 128))
    check_input_shard("down", 1536 // 3, largest_block_size(1536, 128))
    with pytest.raises(ArmorFormatError):
        check_output_shard("k", 192 // 3, largest_block_size(192, 128))


# -- kernels --------------------------------------------------------------------------------------


def _spec(device="cpu", dtype=torch.bfloat16, out_sizes=(64,), d_in=64, has_ab=True) -> LayerSpec:
    return LayerSpec(torch.device(device), dtype, out_sizes, d_in, has_ab)


def test_cpu_auto_picks_dense_fold_for_float32():
    # bf16 CPU layers go to sparse24_cpu where it builds (tests/test_cpu_kernel.py); float32 ones to the fold.
    kernel, reason = choose_kernel(_spec(dtype=torch.float32), "auto")
    assert kernel is DenseFoldKernel and "folded" in reason and "not sparse24" in reason
    assert "not sparse24_cpu: the CPU 2:4 kernel computes in bf16" in reason
    with pytest.raises(ValueError, match="sparse24 is not available"):
        choose_kernel(_spec(), "sparse24")
    assert choose_kernel(_spec(), "factored")[0] is FactoredKernel


def test_kernel_list_order_and_env(monkeypatch):
    assert [k.name for k in KERNELS] == ["triton24", "sparse24", "sparse24_cpu", "dense", "factored"]
    monkeypatch.setenv("VLLM_ARMOR_KERNEL", "Factored ")
    assert choose_kernel(_spec())[0] is FactoredKernel
    monkeypatch.setenv("VLLM_ARMOR_KERNEL", "fastest")
    with pytest.raises(ValueError, match="not one of: auto, triton24, sparse24, sparse24_cpu, dense, factored"):
        choose_kernel(_spec())


def test_sparse24_shape_rules_without_a_gpu(monkeypatch):
    monkeypatch.setattr(Sparse24Kernel, "supports_device", classmethod(lambda cls, device: (True, "pretend")))
    assert Sparse24Kernel.can_implement(_spec(out_sizes=(64, 32), d_in=128))[0]
    assert not Sparse24Kernel.can_implement(_spec(dtype=torch.float32))[0]
    assert not Sparse24Kernel.can_implement(_spec(out_sizes=(64, 8)))[0]
    # A forced kernel that cannot run one layer leaves that layer to auto (here: the next kernel, dense).
    kernel, reason = choose_kernel(_spec(d_in=96, dtype=torch.float32), "sparse24")
    assert kernel is DenseFoldKernel and "cannot run this layer" in reason


def _shards(with_ab: bool, gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    return [af.armorize_linear(torch.randn(d, 64, generator=gen), 16 if with_ab else None, gen) for d in (32, 16)]


@pytest.mark.parametrize("with_ab", [True, False])
def test_factored_op_matches_reference_and_fold(with_ab):
    gen = torch.Generator().manual_seed(0)
    shards = _shards(with_ab, gen)
    x = torch.randn(5, 64, generator=gen)
    bias = torch.randn(48, generator=gen)
    cores = [cf.unpack_2to4(t[cf.CORE_VALUES], t[cf.CORE_META]) for t in shards]
    a = [t[cf.ARMOR_A] for t in shards] if with_ab else []
    b = [t[cf.ARMOR_B] for t in shards] if with_ab else []
    y = torch.ops.vllm_armor.factored_linear(x, cores, a, b, bias)
    dense = [cf.reconstruct_weight(t) for t in shards]
    if with_ab:  # the format's semantics by explicit dense block-diagonal matrices
        explicit = [blockdiag_dense(t[cf.ARMOR_A]) @ c @ blockdiag_dense(t[cf.ARMOR_B]) for t, c in zip(shards, cores,
                                                                                                       strict=True)]
        torch.testing.assert_close(torch.cat(dense), torch.cat(explicit), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, factored_forward(x, cores, a, b, bias))
    torch.testing.assert_close(y, x @ torch.cat(dense).T + bias, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", [DenseFoldKernel, FactoredKernel])
def test_kernels_agree_through_the_interface(kernel):
    gen = torch.Generator().manual_seed(3)
    shards = _shards(True, gen)
    layer = torch.nn.Module()
    k = kernel(_spec(dtype=torch.float32, out_sizes=(32, 16)))
    k.process_weights(layer, shards)
    x = torch.randn(4, 64, generator=gen)
    bias = torch.randn(48, generator=gen)
    ref = x @ torch.cat([cf.reconstruct_weight(t) for t in shards]).T + bias
    torch.testing.assert_close(k.apply(layer, x, bias), ref, rtol=1e-4, atol=1e-4)


def test_factored_op_traces_under_torch_compile():
    gen = torch.Generator().manual_seed(1)
    t = af.armorize_linear(torch.randn(32, 64, generator=gen), 16, gen)
    core = cf.unpack_2to4(t[cf.CORE_VALUES], t[cf.CORE_META])

    def f(x):
        return factored_linear(x, [core], [t[cf.ARMOR_A]], [t[cf.ARMOR_B]], None) * 2

    x = torch.randn(3, 64, generator=gen)
    torch.testing.assert_close(torch.compile(f, backend="eager", fullgraph=True)(x), f(x))
