"""The CPU 2:4 kernel (`vllm_armor/kernels/sparse24_cpu.py`, op ``vllm_armor::sparse24_cpu_linear``) against
the format's reference A·core·B (fp32), through the op, the kernel interface, `ArmorLinear` and torch.compile;
selection by ``auto``; the fallback to the fold when it cannot be built.

The library is built once into the kernel cache (``~/.cache/vllm-armor/kernels/<hash>``) and reused by later
sessions. On a CPU without AVX-512 BF16/VBMI2 the kernel tests skip (the fallback tests still run).
"""

from __future__ import annotations

import subprocess
import sys

import armor_fixtures as af
import pytest
import torch
import torch.nn.functional as F

from vllm_armor import checkpoint_format as cf
from vllm_armor.kernels import LayerSpec, choose_kernel, cpu_build
from vllm_armor.kernels.dense import DenseFoldKernel
from vllm_armor.kernels.factored import FactoredKernel
from vllm_armor.kernels.sparse24_cpu import (
    Sparse24CpuKernel,
    available,
    pack_blocks,
    pack_core,
    packed_numel,
    unpack_core,
)
from vllm_armor.torch_module import ArmorLinear

BF16_RTOL = 2e-2  # max |error| / max |reference|: a few bf16 roundings (values, B x, core x, A)


@pytest.fixture(scope="session")
def cpu_kernel() -> None:
    missing = cpu_build.cpu_missing_flags()
    if missing:
        pytest.skip(f"this CPU lacks {missing}: the CPU 2:4 kernel cannot run here")
    ok, why = available()
    assert ok, why


def _linear(d_out: int, d_in: int, block_out: int | None, block_in: int | None, gen: torch.Generator,
            ab_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    w = torch.randn(d_out, d_in, generator=gen)
    groups = w.abs().reshape(d_out, d_in // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
    a = b = None
    if block_out is not None:
        a = torch.eye(block_out) + 0.3 * torch.randn(d_out // block_out, block_out, block_out, generator=gen)
        b = torch.eye(block_in) + 0.3 * torch.randn(d_in // block_in, block_in, block_in, generator=gen)
    t = cf.encode_linear(w, keep.reshape(d_out, d_in), a, b)
    t[cf.CORE_VALUES] = t[cf.CORE_VALUES].to(torch.bfloat16)
    for s in (cf.ARMOR_A, cf.ARMOR_B):
        if s in t:
            t[s] = t[s].to(ab_dtype)
    return t


def _reference(x: torch.Tensor, shards: list[dict[str, torch.Tensor]], bias: torch.Tensor | None) -> torch.Tensor:
    w = torch.cat([cf.reconstruct_weight(t, torch.float32) for t in shards])
    return F.linear(x.float(), w, None if bias is None else bias.float())


def _core(shards):
    packed = [pack_core(t[cf.CORE_VALUES], t[cf.CORE_META]) for t in shards]
    return [v for v, _ in packed], [p for _, p in packed], [int(t[cf.CORE_VALUES].shape[0]) for t in shards]


def _op(x, shards, bias):
    ab = cf.ARMOR_A in shards[0]
    bf = [lambda t, s=s: pack_blocks(t[s]) for s in (cf.ARMOR_A, cf.ARMOR_B)]
    return torch.ops.vllm_armor.sparse24_cpu_linear(
        x, *_core(shards), [bf[0](t) for t in shards] if ab else [], [bf[1](t) for t in shards] if ab else [],
        bias)


def _assert_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
    assert err < BF16_RTOL, f"relative max error {err:.4f}"


# (d_outs of the shards, d_in, block_out, block_in): every block size the pruner can emit is a divisor of
# its dimension (small ones included), d_in a multiple of 8 (tails of 8, 16 and 24 after the 32-wide chunks).
CASES = [
    ((64,), 64, 16, 16),
    ((72,), 40, 9, 8),
    ((48,), 24, 24, 24),
    ((32, 16, 16), 64, 8, 2),  # fused q/k/v-like shards
    ((96, 96), 72, 1, 9),  # fused gate/up-like shards
    ((576,), 576, 96, 96),
    ((50,), 200, 25, 100),
    ((60,), 120, None, None),  # plain 2:4 (no A/B)
    ((40, 24), 56, None, None),
]


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-b{c[2]}-{c[3]}")
@pytest.mark.parametrize("bias", [False, True])
def test_op_matches_reference_small_m(cpu_kernel, case, m, bias):
    outs, d_in, bo, bi = case
    gen = torch.Generator().manual_seed(m * 7 + d_in)
    shards = [_linear(d, d_in, bo, bi, gen) for d in outs]
    x = torch.randn(m, d_in, generator=gen).to(torch.bfloat16)
    b = torch.randn(sum(outs), generator=gen).to(torch.bfloat16) if bias else None
    _assert_close(_op(x, shards, b), _reference(x, shards, b))


@pytest.mark.parametrize("case", CASES[3:7], ids=lambda c: f"{c[0]}x{c[1]}-b{c[2]}-{c[3]}")
@pytest.mark.parametrize("m", [40, 64, 130])
def test_op_large_m_matches_reference(cpu_kernel, case, m):
    """Prefill-sized calls, across the kernel's 64-token chunks, compute the same layer."""
    outs, d_in, bo, bi = case
    gen = torch.Generator().manual_seed(m)
    shards = [_linear(d, d_in, bo, bi, gen) for d in outs]
    x = torch.randn(m, d_in, generator=gen).to(torch.bfloat16)
    b = torch.randn(sum(outs), generator=gen).to(torch.bfloat16)
    _assert_close(_op(x, shards, b), _reference(x, shards, b))


def test_op_keeps_leading_dims_and_handles_empty_batch(cpu_kernel):
    gen = torch.Generator().manual_seed(5)
    shards = [_linear(32, 64, 16, 16, gen)]
    x = torch.randn(2, 3, 64, generator=gen).to(torch.bfloat16)
    y = _op(x, shards, None)
    assert y.shape == (2, 3, 32)
    _assert_close(y.reshape(6, 32), _reference(x.reshape(6, 64), shards, None))
    assert _op(x[:0], shards, None).shape == (0, 3, 32)


@pytest.mark.parametrize("d_out", [32, 33, 96])
def test_pack_core_is_the_format_core(d_out):
    """pack_core keeps every kept value and its position (unpack_core gives the format's dense core back) and
    holds as many bytes as the checkpoint's values and metadata (rows padded to 32)."""
    gen = torch.Generator().manual_seed(d_out)
    t = _linear(d_out, 88, None, None, gen)
    vals, pats = pack_core(t[cf.CORE_VALUES], t[cf.CORE_META])
    assert torch.equal(unpack_core(vals, pats, d_out), cf.unpack_2to4(t[cf.CORE_VALUES], t[cf.CORE_META]))
    padded = {32: 32, 33: 64, 96: 96}[d_out]
    assert vals.numel() * 2 + pats.numel() == padded * (88 // 2 * 2 + 88 // 8)


def test_a_wrong_metadata_changes_the_result(cpu_kernel):
    """Negative control: the kernel reads the metadata (a shifted keep-pattern gives another product)."""
    gen = torch.Generator().manual_seed(2)
    t = _linear(64, 64, None, None, gen)
    x = torch.randn(1, 64, generator=gen).to(torch.bfloat16)
    wrong = dict(t, **{cf.CORE_META: ((t[cf.CORE_META] << 1) & 0xEE) | ((t[cf.CORE_META] >> 3) & 0x11)})
    assert torch.equal(cf.unpack_mask(wrong[cf.CORE_META]).sum(), cf.unpack_mask(t[cf.CORE_META]).sum())
    err = (_op(x, [wrong], None).float() - _reference(x, [t], None)).abs().max()
    assert err > 0.1


@pytest.mark.parametrize("ab_dtype", [torch.float32, torch.bfloat16])
def test_kernel_interface_and_armorlinear(cpu_kernel, ab_dtype):
    """Through `process_weights`/`apply` with A, B stored as float32 or bf16, both M paths; `ArmorLinear`
    with this kernel agrees with the factored reference module."""
    gen = torch.Generator().manual_seed(11)
    shards = [_linear(d, 96, 32, 48, gen, ab_dtype) for d in (64, 32)]
    layer = torch.nn.Module()
    kernel = Sparse24CpuKernel(LayerSpec(torch.device("cpu"), torch.bfloat16, (64, 32), 96, True))
    kernel.process_weights(layer, shards)
    assert layer.armor_core_vals_0.dtype == torch.bfloat16 and layer.armor_a_packed_1.dtype == torch.bfloat16
    assert not any(p.shape == (64, 96) for p in layer.parameters()), "a dense core was stored"
    bias = torch.randn(96, generator=gen).to(torch.bfloat16)
    for m in (1, 67):
        x = torch.randn(m, 96, generator=gen).to(torch.bfloat16)
        _assert_close(kernel.apply(layer, x, bias), _reference(x, shards, bias))
    single = shards[0]
    fast = ArmorLinear(single, None, torch.bfloat16, kernel=Sparse24CpuKernel)
    ref = ArmorLinear(single, None, torch.bfloat16, kernel=FactoredKernel)
    x = torch.randn(4, 96, generator=gen).to(torch.bfloat16)
    _assert_close(fast(x), ref(x).float())
    assert "kernel=sparse24_cpu" in repr(fast)


def test_op_under_torch_compile(cpu_kernel):
    gen = torch.Generator().manual_seed(4)
    shards = [_linear(d, 64, 16, 32, gen) for d in (32, 16)]
    bias = torch.randn(48, generator=gen).to(torch.bfloat16)

    def f(x):
        return _op(x, shards, bias) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for m in (3, 1, 6):  # fake tensors trace the op's shape function; dynamic M
        x = torch.randn(m, 64, generator=gen).to(torch.bfloat16)
        torch.testing.assert_close(compiled(x), f(x))


def test_auto_picks_it_for_bf16_cpu_layers(cpu_kernel):
    spec = LayerSpec(torch.device("cpu"), torch.bfloat16, (64, 32), 64, True)
    assert choose_kernel(spec, "auto")[0] is Sparse24CpuKernel
    assert choose_kernel(spec, "sparse24_cpu")[0] is Sparse24CpuKernel
    fp32 = LayerSpec(torch.device("cpu"), torch.float32, (64,), 64, True)
    kernel, reason = choose_kernel(fp32, "auto")
    assert kernel is DenseFoldKernel and "computes in bf16" in reason


@pytest.fixture
def fresh_build_state(monkeypatch):
    monkeypatch.setattr(cpu_build, "_STATE", {})


def test_build_failure_falls_back_to_the_fold(fresh_build_state, monkeypatch):
    def broken(where):
        raise RuntimeError("Error building extension 'armor_sparse24_cpu': g++ not found")

    monkeypatch.setattr(cpu_build, "_build", broken)
    monkeypatch.setattr(cpu_build, "cpu_missing_flags", lambda: [])
    spec = LayerSpec(torch.device("cpu"), torch.bfloat16, (64,), 64, True)
    kernel, reason = choose_kernel(spec, "auto")
    assert kernel is DenseFoldKernel
    assert "not sparse24_cpu: the CPU 2:4 kernel did not build (Error building extension" in reason
    assert "\n" not in reason
    with pytest.raises(ValueError, match="sparse24_cpu is not available: the CPU 2:4 kernel did not build"):
        choose_kernel(spec, "sparse24_cpu")


def test_missing_cpu_instructions_fall_back_to_the_fold(fresh_build_state, monkeypatch):
    monkeypatch.setattr(cpu_build, "cpu_missing_flags", lambda: ["avx512_bf16"])
    monkeypatch.setattr(cpu_build, "_build", lambda where: pytest.fail("built on a CPU without the instructions"))
    kernel, reason = choose_kernel(LayerSpec(torch.device("cpu"), torch.bfloat16, (64,), 64, True), "auto")
    assert kernel is DenseFoldKernel and "this CPU lacks avx512_bf16" in reason


def test_env_disables_the_kernel_in_a_fresh_process():
    code = ("import torch; from vllm_armor.kernels import LayerSpec, choose_kernel; "
            "print(*choose_kernel(LayerSpec(torch.device('cpu'), torch.bfloat16, (64,), 64, True)), sep='|')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**_env(), "VLLM_ARMOR_CPU_KERNEL": "0"}).stdout
    assert "DenseFoldKernel" in out and "disabled by VLLM_ARMOR_CPU_KERNEL=0" in out, out


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "VLLM_ARMOR_KERNEL"}


def test_tiny_model_shards_through_the_kernel(cpu_kernel):
    """The tiny test models' tensors (armor_fixtures) as fused q/k/v."""
    gen = torch.Generator().manual_seed(0)
    shards = [af.armorize_linear(torch.randn(d, 384, generator=gen).to(torch.bfloat16), 64, gen)
              for d in (384, 192, 192)]
    x = torch.randn(3, 384, generator=gen).to(torch.bfloat16)
    _assert_close(_op(x, shards, None), _reference(x, shards, None))


@pytest.mark.parametrize("bs", [1, 2, 8, 9, 16, 24, 33])
def test_pack_blocks_layout(bs):
    """packed[J, c, p, l, t] = blocks[J, 16c + l, 2p + t], zero past bs; packed_numel counts the padding."""
    gen = torch.Generator().manual_seed(bs)
    blocks = torch.randn(3, bs, bs, generator=gen).to(torch.bfloat16)
    packed = pack_blocks(blocks)
    assert packed.dtype == torch.bfloat16 and packed.is_contiguous()
    assert packed.numel() == packed_numel(3, bs)
    chunks, pairs = packed.shape[1], packed.shape[2]
    back = packed.permute(0, 1, 3, 2, 4).reshape(3, chunks * 16, pairs * 2)
    assert torch.equal(back[:, :bs, :bs], blocks)
    assert not back[:, bs:].any() and not back[:, :, bs:].any()


def test_op_refuses_unpacked_blocks(cpu_kernel):
    gen = torch.Generator().manual_seed(6)
    t = _linear(32, 64, 16, 16, gen)
    x = torch.randn(2, 64, generator=gen).to(torch.bfloat16)
    raw = [t[cf.ARMOR_A].to(torch.bfloat16).contiguous()], [t[cf.ARMOR_B].to(torch.bfloat16).contiguous()]
    with pytest.raises(RuntimeError, match="packed blocks"):
        torch.ops.vllm_armor.sparse24_cpu_linear(x, *_core([t]), *raw, None)
