"""`sparse24`: the factored layer with the core on 2:4 sparse tensor cores via torch's cuSPARSELt bindings
(CUDA sm80+), custom op ``vllm_armor::sparse24_linear``.

NOT YET RUN ON A GPU (`bench/gpu_check.py` times it beside `triton24`). `auto` prefers `triton24`, which keeps
the core in the checkpoint's compressed bytes: cuSPARSELt needs its own opaque compressed copy, and pads the
dense operand so that decode (M=1) runs far slower than dense (pytorch issue 111339). Chosen where `triton24`
cannot run a layer, or with ``VLLM_ARMOR_KERNEL=sparse24`` (a CUDA device of capability >= 8.0 and cuSPARSELt
in the torch build); the CPU backend never reaches it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vllm_armor.kernels.base import LayerSpec, cuda_sm80
from vllm_armor.kernels.factored import FactoredKernel, factored_forward

CSLT_ALIGN = 16  # cuSPARSELt wants the dense operand's token count aligned (torch pads fp16/bf16 to 16 too)


def _cslt_linear(x: torch.Tensor, compressed: torch.Tensor) -> torch.Tensor:
    """x @ core^T with a cuSPARSELt-compressed 2:4 core: core @ x^T on the transposed view of x (no copy), the
    result returned already transposed (T, d_out); x is padded (copied) only when T is not aligned."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    tokens = x2.shape[0]
    if tokens % CSLT_ALIGN:
        x2 = F.pad(x2, (0, 0, 0, CSLT_ALIGN - tokens % CSLT_ALIGN))
    y = torch._cslt_sparse_mm(compressed, x2.t(), transpose_result=True)  # (T, d_out)
    return y[:tokens].reshape(*lead, -1)


@torch.library.custom_op("vllm_armor::sparse24_linear", mutates_args=())
def sparse24_linear(
    x: torch.Tensor,
    compressed_cores: list[torch.Tensor],
    out_sizes: list[int],
    a_blocks: list[torch.Tensor],
    b_blocks: list[torch.Tensor],
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return factored_forward(x, compressed_cores, a_blocks, b_blocks, bias, core_matmul=_cslt_linear)


@sparse24_linear.register_fake
def _sparse24_linear_fake(x, compressed_cores, out_sizes, a_blocks, b_blocks, bias):
    return x.new_empty((*x.shape[:-1], sum(out_sizes)))


class Sparse24Kernel(FactoredKernel):
    name = "sparse24"
    description = "2:4 core on sparse tensor cores (cuSPARSELt), A and B as batched matmuls"

    @classmethod
    def supports_device(cls, device: torch.device) -> tuple[bool, str]:
        ok, why = cuda_sm80(device)
        cusparselt = getattr(torch.backends, "cusparselt", None)
        if ok and (cusparselt is None or not cusparselt.is_available()):
            return False, "this torch build has no cuSPARSELt"
        return ok, f"{why} with cuSPARSELt" if ok else why

    @classmethod
    def layer_refusal(cls, spec: LayerSpec) -> str | None:
        # cuSPARSELt constraints on the sparse operand: fp16/bf16, dims multiples of 16 / 64.
        if spec.dtype not in (torch.float16, torch.bfloat16):
            return f"cuSPARSELt needs fp16/bf16, the layer computes in {spec.dtype}"
        if any(rows % 16 for rows in spec.out_sizes) or spec.d_in % 64:
            return f"shape/dtype outside cuSPARSELt limits (rows {spec.out_sizes}, d_in {spec.d_in})"
        return None

    def prepare_core(self, core: torch.Tensor) -> torch.Tensor:
        return torch._cslt_compress(core.contiguous())

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        cores, a, b = self.factors(layer)
        return torch.ops.vllm_armor.sparse24_linear(x, cores, list(self.spec.out_sizes), a, b, bias)
