"""`sparse24_cpu`: the 2:4 core kept compressed in memory (checkpoint values in bf16 + the uint8 keep-mask
metadata, as stored) and multiplied by a C++ AVX-512 BF16 kernel, custom op ``vllm_armor::sparse24_cpu_linear``
(`csrc/sparse24_cpu.cpp`, built by `cpu_build.py`); A and B in bf16.

Paths inside the op, by the number of tokens M of a call:

* M < `DENSE_MIN_M` (decode, small batches): B, core and A as three parallel passes; the core pass streams
  the compressed core (1.125 bytes per original weight instead of 2) with masked expand-loads and bf16 dot
  products, each expanded chunk serving up to 8 tokens from registers.
* M >= `DENSE_MIN_M` (prefill): the same B and A passes; the core decompressed 2 MiB of rows at a time into a
  scratch buffer for at::mm (oneDNN); no dense copy of the weight is ever held.

A and B are held packed (`pack_blocks`): 16 outputs x an input pair per vector, the layout the
block-diagonal passes read with bf16 dot products.

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

# Calls with at least this many tokens take the tile-decompression + oneDNN path (bench/cpu_layer_speed.py).
DENSE_MIN_M = 32


_FAKE_REGISTERED: list[bool] = []


def _sparse24_cpu_linear_fake(x, values, metas, a_packed, b_packed, bias, dense_min_m):
    return x.new_empty((*x.shape[:-1], sum(int(v.shape[0]) for v in values)))


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
    def can_implement(cls, spec: LayerSpec) -> tuple[bool, str]:
        if spec.device.type != "cpu":
            return False, f"device is {spec.device.type}, the compressed 2:4 kernel is for CPUs"
        if spec.dtype != torch.bfloat16:
            return False, f"the CPU 2:4 kernel computes in bf16, the layer in {spec.dtype}"
        if spec.d_in % fmt.META_INPUTS:
            return False, f"d_in {spec.d_in} is not a multiple of 8"
        return available()

    def process_weights(self, layer: nn.Module, shards: Sequence[Mapping[str, torch.Tensor]]) -> None:
        self.n_shards = len(shards)
        for i, tensors in enumerate(shards):
            register_frozen(layer, f"armor_values_{i}", _bf16(tensors[fmt.CORE_VALUES]))
            register_frozen(layer, f"armor_meta_{i}", tensors[fmt.CORE_META].contiguous())
            if self.spec.has_ab:
                register_frozen(layer, f"armor_a_packed_{i}", pack_blocks(tensors[fmt.ARMOR_A]))
                register_frozen(layer, f"armor_b_packed_{i}", pack_blocks(tensors[fmt.ARMOR_B]))

    def _tensors(self, layer: nn.Module, kind: str) -> list[torch.Tensor]:
        return [getattr(layer, f"armor_{kind}_{i}") for i in range(self.n_shards)]

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ab = self.spec.has_ab
        return torch.ops.vllm_armor.sparse24_cpu_linear(
            x, self._tensors(layer, "values"), self._tensors(layer, "meta"),
            self._tensors(layer, "a_packed") if ab else [], self._tensors(layer, "b_packed") if ab else [], bias,
            DENSE_MIN_M)


def _bf16(t: torch.Tensor) -> torch.Tensor:
    """A format tensor (float32 or bf16 in the checkpoint) as the contiguous bf16 the kernel reads."""
    return t.to(torch.bfloat16).contiguous()


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
