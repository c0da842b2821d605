"""The Triton 2:4 kernels (`vllm_armor/kernels/triton24.py`) on CPU through Triton's interpreter, against the
format's fp32 reference `reconstruct_weight`; the kernel choice and fallback on CUDA (device queries faked).

Interpreter set-up (module fixture): ``TRITON_INTERPRET=1`` is set before the kernels are first jitted (they are
jitted on first use, so the import order does not matter). The interpreter computes ``tl.dot`` on bf16 operands
as integers on their raw bits (numpy has no bf16: they are held as uint16), so its dot is patched here to widen
bf16 to fp32 first, exactly (bf16 is the top half of an fp32); elementwise bf16 arithmetic is also wrong there,
which is why the kernels convert every load to fp32 before computing. The patched dot also records every dot's
(M, N, K), and the interpreter's unmasked-load entry point records every load without a mask: the tests assert
that every dot is at least 16 in each dimension (a GPU needs K >= 16) and that no load went unmasked (an
unmasked out-of-bounds load reads garbage silently in the interpreter).

On a GPU, ``ARMOR_TRITON_TESTS=cuda`` runs the same cases compiled for real (`bench/gpu_check.py` does): no
interpreter, the tensors on the GPU, the interpreter-only records not asserted.
"""

from __future__ import annotations

import ast
import inspect
import logging
import os

import numpy as np
import pytest
import torch
from torch import nn

from vllm_armor import checkpoint_format as fmt
from vllm_armor.kernels import KERNELS, DenseFoldKernel, LayerSpec, build_kernel, choose_kernel, triton24
from vllm_armor.kernels.triton24 import DECODE_MAX_M, Triton24Kernel, decode_split

M_VALUES = (1, 2, 3, 8, 16, 17, 64)
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}  # relative Frobenius error vs the fp32 reference
ON_GPU = os.environ.get("ARMOR_TRITON_TESTS") == "cuda"
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    if ON_GPU:
        yield None
        return
    import triton.language as tl
    from triton.runtime import interpreter as ti

    if not isinstance(tl.sum, ti.InterpretedFunction):
        pytest.fail("triton was imported before tests/conftest.py could import it for its interpreter")
    records = {"dots": [], "unmasked": 0}
    builder = type(ti.interpreter_builder)
    original_load = builder.create_load

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        records["dots"].append((a.data.shape[-2], b.data.shape[-1], a.data.shape[-1]))
        return ti.TensorHandle(np.matmul(_fp32(a), _fp32(b)) + d.data, d.dtype.scalar)

    def create_load(self, *args, **kwargs):
        records["unmasked"] += 1
        return original_load(self, *args, **kwargs)

    patch = pytest.MonkeyPatch()
    patch.setenv("TRITON_INTERPRET", "1")
    patch.setattr(builder, "create_dot", create_dot)
    patch.setattr(builder, "create_load", create_load)
    triton24.clear_compiled()
    yield records
    patch.undo()
    triton24.clear_compiled()


def _fp32(handle) -> np.ndarray:
    import triton.language as tl

    if handle.dtype == tl.bfloat16:  # raw bf16 bits -> the fp32 with those top 16 bits
        return (handle.data.astype(np.uint32) << 16).view(np.float32)
    return handle.data.astype(np.float32)


def _shard(d_out: int, d_in: int, blocks: tuple[int, int] | None, dtype: torch.dtype, ab_dtype: torch.dtype,
           gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Format tensors of one pruned linear: random kept values, a random 2:4 mask, A and B near identity."""
    keep = torch.rand(d_out, d_in // 4, 4, generator=gen).argsort(-1)[..., :2]
    mask = torch.zeros(d_out, d_in // 4, 4, dtype=torch.bool).scatter_(2, keep, True).reshape(d_out, d_in)
    core = torch.randn(d_out, d_in, generator=gen) * mask
    a = b = None
    if blocks is not None:
        (bo, bi) = blocks
        a = torch.eye(bo) + 0.2 * torch.randn(d_out // bo, bo, bo, generator=gen)
        b = torch.eye(bi) + 0.2 * torch.randn(d_in // bi, bi, bi, generator=gen)
    tensors = fmt.encode_linear(core, mask, a, b)
    tensors[fmt.CORE_VALUES] = tensors[fmt.CORE_VALUES].to(dtype)
    for suffix in (fmt.ARMOR_A, fmt.ARMOR_B):
        if suffix in tensors:
            tensors[suffix] = tensors[suffix].to(ab_dtype)
    return {suffix: t.to(DEVICE) for suffix, t in tensors.items()}


# Llama-2-7B (hidden 4096, MLP 11008, MHA) and Llama-3-8B (hidden 4096, MLP 14336, GQA 1024 k/v) scaled down
# 32x (one exception below): (name, rows of every shard, d_in, (A, B) block sizes of every shard). 7B's `auto`
# sizes are 128 and 172 (11008 = 64 x 172): kept, like 24 for SmolLM2's 1536-row MLP; the 8-sized ones are
# `auto` at these sizes.
# Every layer runs with A/B in one dtype and without in the other (the dtype alternating over the layers), so
# both dtypes meet every layer kind while the interpreter's time stays small.
LAYERS = [
    ("llama2_qkv", (128, 128, 128), 128, [(16, 16), (16, 16), (16, 16)]),
    ("llama3_qkv_gqa", (128, 32, 32), 128, [(32, 32), (16, 8), (8, 16)]),
    ("llama2_gate_up", (688, 688), 128, [(172, 128), (172, 128)]),  # 16x: 344 rows have no 16-row tile
    ("llama2_down", (128,), 344, [(128, 172)]),
    ("llama3_gate_up_auto", (448, 448), 128, [(8, 8), (8, 8)]),
    ("llama3_down", (128,), 448, [(128, 64)]),
    ("smollm2_mlp_like", (96,), 192, [(24, 24)]),
]
DTYPES = (torch.float16, torch.bfloat16)
# The two largest layers with A/B take ~25 s in the interpreter: `make test` runs them, `make test-fast` (marker
# `slow`) leaves them out; their plain halves and every other layer with A/B stay in the fast loop.
SLOW_WITH_AB = ("llama2_gate_up", "llama3_gate_up_auto")
CASES = [pytest.param(*layer, DTYPES[(i + ab) % 2], ab, id=f"{layer[0]}-{str(DTYPES[(i + ab) % 2])[6:]}-"
                      f"{'ab' if ab else 'plain'}", marks=[pytest.mark.slow] if ab and layer[0] in SLOW_WITH_AB else [])
         for i, layer in enumerate(LAYERS) for ab in (True, False)]


def _layer(rows, d_in, blocks, dtype, ab, gen, ab_dtype=None):
    ab_dtype = ab_dtype or dtype
    shards = [_shard(r, d_in, bl if ab else None, dtype, ab_dtype, gen) for r, bl in zip(rows, blocks, strict=True)]
    layer = nn.Module()
    kernel = Triton24Kernel(LayerSpec(DEVICE, dtype, tuple(rows), d_in, ab))
    kernel.process_weights(layer, shards)  # includes the load-time self-check (M = 1 and M = 17)
    return layer, kernel, shards


def _reference(x: torch.Tensor, shards, bias: torch.Tensor | None) -> torch.Tensor:
    weight = torch.cat([fmt.reconstruct_weight(t, torch.float32) for t in shards])
    y = x.float() @ weight.t().to(x.device)
    return y + bias.float() if bias is not None else y


def _randn(*shape: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


def _interpreted_cleanly(records) -> None:
    if records is None:
        return  # compiled on a GPU: the interpreter's records do not exist
    assert records["unmasked"] == 0, "a kernel load without a mask"
    assert records["dots"] and min(min(d) for d in records["dots"]) >= 16, "a tl.dot smaller than 16"


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


@pytest.mark.parametrize(("name", "rows", "d_in", "blocks", "dtype", "ab"), CASES)
def test_kernel_matches_the_format_reference(name, rows, d_in, blocks, dtype, ab, interpreter):
    gen = torch.Generator().manual_seed(len(name) + 7 * ab)
    layer, kernel, shards = _layer(rows, d_in, blocks, dtype, ab, gen,
                                   ab_dtype=torch.float32 if name.startswith("llama2") else dtype)
    bias = _randn(sum(rows), gen=gen, dtype=dtype) if ab == (len(rows) > 1) else None
    for m in M_VALUES:
        x = _randn(m, d_in, gen=gen, dtype=dtype)
        y = kernel.apply(layer, x, bias)
        assert y.shape == (m, sum(rows)) and y.dtype == dtype
        err = _rel_err(y, _reference(x, shards, bias))
        assert err < TOLERANCE[dtype], f"M={m}: relative error {err:.2e}"
    # a 3-D input (batch, tokens, d_in) as vLLM's transformers backend passes it
    x = _randn(2, 5, d_in, gen=gen, dtype=dtype)
    assert _rel_err(kernel.apply(layer, x, bias), _reference(x, shards, bias)) < TOLERANCE[dtype]
    _interpreted_cleanly(interpreter)


def test_decode_split_over_k_on_a_large_gpu(interpreter):
    """The decode kernel's split-K (fp32 partials summed by the epilogue): few rows on many multiprocessors."""
    gen = torch.Generator().manual_seed(3)
    layer, kernel, shards = _layer((64,), 1024, [(16, 32)], torch.bfloat16, True, gen)
    kernel.n_sms = 132  # an H100's count
    for m in (1, 5, DECODE_MAX_M):
        assert decode_split(64, 512, m, kernel.n_sms)[0] > 1
        x = _randn(m, 1024, gen=gen, dtype=torch.bfloat16)
        assert _rel_err(kernel.apply(layer, x, None), _reference(x, shards, None)) < TOLERANCE[torch.bfloat16]


def test_every_kernel_load_is_masked_in_the_source():
    """Static twin of the runtime record: every tl.load in the kernels' source passes a mask, executed or not."""
    tree = ast.parse(inspect.getsource(triton24))
    loads = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and node.func.attr == "load" and getattr(node.func.value, "id", None) == "tl"]
    assert len(loads) >= 8
    for node in loads:
        assert any(k.arg == "mask" for k in node.keywords), f"unmasked tl.load at line {node.lineno}"


def test_custom_op_under_torch_compile_and_opcheck(interpreter):
    gen = torch.Generator().manual_seed(5)
    layer, kernel, shards = _layer((64, 32), 128, [(16, 16), (8, 16)], torch.float16, True, gen)
    bias = _randn(96, gen=gen, dtype=torch.float16)
    compiled = torch.compile(lambda x: kernel.apply(layer, x, bias), backend="aot_eager", fullgraph=True)
    for m in (1, 33):
        x = _randn(m, 128, gen=gen, dtype=torch.float16)
        assert torch.equal(compiled(x), kernel.apply(layer, x, bias))
    x = _randn(3, 128, gen=gen, dtype=torch.float16)
    args = (x, layer.armor_values, layer.armor_meta, layer.armor_planes, layer.armor_b_flat, layer.armor_b_items,
            layer.armor_a_flat, layer.armor_out_items, bias, kernel.n_planes, kernel.n_sms, kernel.tile_n)
    torch.library.opcheck(torch.ops.vllm_armor.triton24_linear.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_self_check_refuses_a_kernel_that_computes_wrong(interpreter):
    gen = torch.Generator().manual_seed(9)
    layer, kernel, shards = _layer((64,), 128, [(16, 16)], torch.bfloat16, True, gen)
    other = [_shard(64, 128, (16, 16), torch.bfloat16, torch.bfloat16, gen)]
    with pytest.raises(RuntimeError, match="self-check failed at M=1"):
        kernel.self_check(layer, other)


def _cuda_spec(dtype=torch.bfloat16, out_sizes=(256, 64, 64), d_in=256) -> LayerSpec:
    return LayerSpec(torch.device("cuda", 0), dtype, out_sizes, d_in, True)


def test_auto_picks_triton24_on_sm80_and_later(monkeypatch):
    from vllm_armor.kernels import sparse24

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(sparse24.Sparse24Kernel, "supports_device", classmethod(lambda cls, d: (False, "no")))
    kernel, reason = choose_kernel(_cuda_spec(), "auto")
    assert kernel is Triton24Kernel and f"M <= {DECODE_MAX_M}" in reason and "tile kernel" in reason
    # fp32 layers and shards without a common 16-row tile are left to the next kernel that can run them
    assert choose_kernel(_cuda_spec(dtype=torch.float32), "auto")[0] is DenseFoldKernel
    assert choose_kernel(_cuda_spec(out_sizes=(64, 40)), "auto")[0] is DenseFoldKernel
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    kernel, reason = choose_kernel(_cuda_spec(), "auto")
    assert kernel is DenseFoldKernel and "not triton24: GPU capability 7.5 < 8.0" in reason


def test_a_kernel_that_fails_to_build_leaves_the_layer_to_the_next(monkeypatch, caplog):
    """The fallback is the same for every kernel: here the CPU 2:4 kernel (when it builds on this machine) is made
    to fail after registering its parameters; the layer must end on the dense fold, with one warning naming why,
    none of the failed kernel's parameters left behind, and the right output."""
    spec = LayerSpec(torch.device("cpu"), torch.bfloat16, (64, 32), 128, True)
    first = choose_kernel(spec, "auto")[0]
    original = first.process_weights

    def fail(self, layer, shards):
        original(self, layer, shards)
        raise RuntimeError("compile error: boom")

    gen = torch.Generator().manual_seed(11)
    shards = [_shard(r, 128, (16, 16), torch.bfloat16, torch.bfloat16, gen) for r in (64, 32)]
    probe = nn.Module()
    original(first(spec), probe, shards)
    failed_params = {n for n, _ in probe.named_parameters()}
    monkeypatch.setattr(first, "process_weights", fail)
    layers = [nn.Module(), nn.Module()]
    with caplog.at_level(logging.DEBUG, logger="vllm.armor"):
        built = [build_kernel(layer, spec, shards, f"model.layers.{i}.qkv") for i, layer in enumerate(layers)]
    fallback = next(c for c in KERNELS[KERNELS.index(first) + 1:] if c.can_implement(spec)[0])
    assert all(type(k) is fallback and "boom" in reason for k, reason in built)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "boom" in warnings[0].getMessage() and first.name in warnings[0].getMessage()
    probe = nn.Module()
    fallback(spec).process_weights(probe, shards)
    assert {n for n, _ in layers[0].named_parameters()} == {n for n, _ in probe.named_parameters()}
    assert failed_params - {n for n, _ in probe.named_parameters()}, "the test needs a kernel with own parameters"
    x = torch.randn(4, 128, generator=gen).to(torch.bfloat16)
    assert _rel_err(built[0][0].apply(layers[0], x, None), _reference(x, shards, None)) < 2e-2
