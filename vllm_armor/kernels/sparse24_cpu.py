"""`sparse24_cpu`: the 2:4 core kept compressed in memory and multiplied by a C++ AVX-512 BF16 kernel, custom op
``vllm_armor::sparse24_cpu_linear`` (`csrc/sparse24_cpu.cpp`, built by `cpu_build.py`); A and B in bf16.

At load the checkpoint's core (values + keep-mask bits, docs/FORMAT.md) is rearranged once by `pack_core`: rows
in blocks of 32, per group of 4 inputs the 2 kept values of each row and a 4-bit pattern number (which 2 of
the 4 inputs), as compact as the checkpoint. Per token the kernel tabulates every group's 6 possible input
pairs; one permute gives 16 rows their pairs and one bf16 dot product adds both kept products: only kept
weights are multiplied. A and B are held packed too (`pack_blocks`: 16 outputs x an input pair per vector).

Every call, decode or prefill, runs B, core and A as three parallel passes over the packed weights, up to 8
tokens per pass over them; no dense copy of the weight is ever held. (A prefill path that decompressed tiles
of the core for oneDNN was slower than this one at every M tried, 16 to 512, on SmolLM2's shapes in a one-off
comparison while the kernel was written: e.g. 576x576, M=512, core alone, 1 thread: 1931 us vs 1821 us.)

Where the kernel cannot be built or the CPU lacks AVX-512 BF16/VBMI2, `supports_device` says why and `auto`
keeps the dense fold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from vllm_armor import checkpoint_format as fmt
from vllm_armor.kernels import cpu_build
from vllm_armor.kernels.base import ArmorKernel, LayerSpec, register_frozen

_FAKE_REGISTERED: list[bool] = []


def _sparse24_cpu_linear_fake(x, core_vals, core_pats, rows, a_packed, b_packed, bias):
    return x.new_empty((*x.shape[:-1], sum(rows)))


def available() -> tuple[bool, str]:
    """(ok, reason): build/load the C++ op once per process and give it its fake (shape-only) implementation
    for torch.compile; the op only exists once its library is loaded."""
    ok, why = cpu_build.load()
    if ok and not _FAKE_REGISTERED:
        torch.library.register_fake("vllm_armor::sparse24_cpu_linear", _sparse24_cpu_linear_fake)
        _FAKE_REGISTERED.append(True)
    return ok, why


class Sparse24CpuKernel(ArmorKernel):
    name = "sparse24_cpu"
    description = "compressed 2:4 core on CPU (AVX-512 BF16 C++ kernel), A and B in bf16"

    @classmethod
    def supports_device(cls, device: torch.device) -> tuple[bool, str]:
        if device.type != "cpu":
            return False, f"device is {device.type}, the compressed 2:4 kernel is for CPUs"
        return available()

    @classmethod
    def layer_refusal(cls, spec: LayerSpec) -> str | None:
        if spec.dtype != torch.bfloat16:
            return f"the CPU 2:4 kernel computes in bf16, the layer in {spec.dtype}"
        if spec.d_in % fmt.META_INPUTS:
            return f"d_in {spec.d_in} is not a multiple of 8"
        return None

    def process_weights(self, layer: nn.Module, shards: Sequence[Mapping[str, torch.Tensor]]) -> None:
        self.rows = [int(t[fmt.CORE_VALUES].shape[0]) for t in shards]
        for i, tensors in enumerate(shards):
            vals, pats = pack_core(tensors[fmt.CORE_VALUES], tensors[fmt.CORE_META])
            register_frozen(layer, f"armor_core_vals_{i}", vals)
            register_frozen(layer, f"armor_core_pats_{i}", pats)
            if self.spec.has_ab:
                register_frozen(layer, f"armor_a_packed_{i}", pack_blocks(tensors[fmt.ARMOR_A]))
                register_frozen(layer, f"armor_b_packed_{i}", pack_blocks(tensors[fmt.ARMOR_B]))

    def _tensors(self, layer: nn.Module, kind: str) -> list[torch.Tensor]:
        return [getattr(layer, f"armor_{kind}_{i}") for i in range(len(self.rows))]

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ab = self.spec.has_ab
        return torch.ops.vllm_armor.sparse24_cpu_linear(
            x, self._tensors(layer, "core_vals"), self._tensors(layer, "core_pats"), self.rows,
            self._tensors(layer, "a_packed") if ab else [], self._tensors(layer, "b_packed") if ab else [], bias)


# Pattern number of each keep-nibble (bit j: input j of the group kept); the kernel's kP0/kP1 list the same order.
PATTERNS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
_PATTERN_OF_NIBBLE = torch.zeros(16, dtype=torch.uint8)
for _k, (_p0, _p1) in enumerate(PATTERNS):
    _PATTERN_OF_NIBBLE[(1 << _p0) | (1 << _p1)] = _k


def pack_core(values: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint's core (values (d_out, d_in/2), keep-mask bytes (d_out, d_in/8)) as the op reads it:
    rows zero-padded to a multiple of 32; vals (Q, G, 2, 16, 2) bf16 with vals[q, g, h, l, t] the t-th kept value
    of row 32q + 16h + l in group g (inputs 4g..4g+3); pats (Q, G, 16) uint8 with the pattern number (`PATTERNS`)
    of row 32q + l in the low nibble and of row 32q + 16 + l in the high one. Same bytes as the checkpoint."""
    d_out, half = values.shape
    groups = half // 2
    keep = fmt.unpack_mask(meta).reshape(d_out, groups, fmt.GROUP).long()  # the format's bit layout, one home
    pattern = _PATTERN_OF_NIBBLE[(keep << torch.arange(fmt.GROUP)).sum(-1)]
    padded = padded_rows(d_out)
    vals = values.new_zeros(padded, half, dtype=torch.bfloat16)
    vals[:d_out] = values
    pats = torch.zeros(padded, groups, dtype=torch.uint8)
    pats[:d_out] = pattern
    q = padded // 32
    vals = vals.reshape(q, 2, 16, groups, 2).permute(0, 3, 1, 2, 4).contiguous()
    pats = pats.reshape(q, 2, 16, groups).permute(0, 3, 2, 1)
    return vals, (pats[..., 0] | (pats[..., 1] << 4)).contiguous()


def padded_rows(d_out: int) -> int:
    """Rows `pack_core` holds for a core of d_out rows (blocks of 32)."""
    return -(-d_out // 32) * 32


def unpack_core(vals: torch.Tensor, pats: torch.Tensor, rows: int) -> torch.Tensor:
    """The dense (rows, d_in) core of `pack_core`'s output (for checks; the kernel never expands it)."""
    q, groups = pats.shape[:2]
    low, high = (pats & 15).long(), (pats >> 4).long()
    pattern = torch.stack([low, high], dim=2).permute(0, 2, 3, 1).reshape(q * 32, groups)  # (row, group)
    values = vals.permute(0, 2, 3, 1, 4).reshape(q * 32, groups, 2)
    dense = values.new_zeros(q * 32, groups, 4)
    first = torch.tensor([p for p, _ in PATTERNS])[pattern]
    second = torch.tensor([p for _, p in PATTERNS])[pattern]
    dense.scatter_(2, first.unsqueeze(-1), values[..., :1]).scatter_(2, second.unsqueeze(-1), values[..., 1:])
    return dense.reshape(q * 32, groups * 4)[:rows]


def pack_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Blocks (n, bs, bs) of A or B as the op takes them: (n, ceil(bs/16), ceil(bs/2), 16, 2) bf16 with
    packed[J, c, p, l, t] = blocks[J, 16c + l, 2p + t] (zero past bs): 16 outputs x an input pair per vector."""
    n, bs, _ = blocks.shape
    chunks, pairs = _packed_dims(bs)
    padded = blocks.new_zeros(n, chunks * 16, pairs * 2)
    padded[:, :bs, :bs] = blocks
    return padded.reshape(n, chunks, 16, pairs, 2).permute(0, 1, 3, 2, 4).to(torch.bfloat16).contiguous()


def _packed_dims(bs: int) -> tuple[int, int]:
    return -(-bs // 16), -(-bs // 2)


def packed_numel(n: int, bs: int) -> int:
    """Elements of `pack_blocks` for n blocks of size bs (zero padding included): what the server holds."""
    chunks, pairs = _packed_dims(bs)
    return n * chunks * 16 * pairs * 2
