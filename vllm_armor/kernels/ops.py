"""ARMOR forward as `torch.library` custom ops, so that torch.compile (vLLM's default) sees one opaque node.

Why custom ops: the factored forward's graph depends on the checkpoint (A/B present or not, one shard or
three) and on the kernel choice, none of which vLLM's compile cache key covers. As one opaque node with a
fixed signature the traced graph is the same for every checkpoint, so a cached graph can never encode a
stale layout. (The kernel choice itself is added to the cache key by the plugin, see `vllm_armor.plugin`.)

Ops (namespace ``vllm_armor``):

* ``factored_linear(x, cores, a_blocks, b_blocks, bias)``: y = concat_s A_s (core_s (B_s x)) + bias with
  dense zero-filled 2:4 cores; one entry per shard of a fused layer (q/k/v, gate/up), ``a_blocks`` and
  ``b_blocks`` empty for plain 2:4 checkpoints. Batched block-diagonal matmuls, no loop over blocks.
* ``sparse24_linear(...)``: the same with cuSPARSELt-compressed cores (CUDA sm80+, see `sparse24.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_armor.kernels.blockdiag import block_diag_matmul


def _out_features(cores: list[torch.Tensor]) -> int:
    return sum(int(c.shape[0]) for c in cores)


def factored_forward(
    x: torch.Tensor,
    cores: list[torch.Tensor],
    a_blocks: list[torch.Tensor],
    b_blocks: list[torch.Tensor],
    bias: torch.Tensor | None,
    core_matmul=F.linear,
) -> torch.Tensor:
    """Shared body of the custom ops (and usable directly, e.g. eagerly or offline)."""
    outs = []
    for i, core in enumerate(cores):
        xi = block_diag_matmul(x, b_blocks[i]) if b_blocks else x
        yi = core_matmul(xi, core)
        if a_blocks:
            yi = block_diag_matmul(yi, a_blocks[i])
        outs.append(yi)
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    if bias is not None:
        y = y + bias
    return y


@torch.library.custom_op("vllm_armor::factored_linear", mutates_args=())
def factored_linear(
    x: torch.Tensor,
    cores: list[torch.Tensor],
    a_blocks: list[torch.Tensor],
    b_blocks: list[torch.Tensor],
    bias: torch.Tensor | None,
) -> torch.Tensor:
    y = factored_forward(x, cores, a_blocks, b_blocks, bias)
    return y.clone() if y is x else y


@factored_linear.register_fake
def _factored_linear_fake(x, cores, a_blocks, b_blocks, bias):
    return x.new_empty((*x.shape[:-1], _out_features(cores)))


def _cslt_linear(x: torch.Tensor, compressed: torch.Tensor) -> torch.Tensor:
    """x @ core^T with a cuSPARSELt-compressed 2:4 core (CUDA only; UNTESTED on real hardware here)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = torch._cslt_sparse_mm(compressed, x2.t().contiguous())  # (d_out, T)
    return y.t().reshape(*lead, -1)


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
