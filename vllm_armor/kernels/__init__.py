"""Compute kernels of the ARMOR linear layer, shared by the offline `ArmorLinear` and the vLLM plugin."""

from vllm_armor.kernels.blockdiag import armor_linear_dense_core, block_diag_matmul

__all__ = ["armor_linear_dense_core", "block_diag_matmul"]
