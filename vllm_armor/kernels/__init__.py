"""Compute kernels of the ARMOR linear layer, shared by the offline `ArmorLinear` and the vLLM plugin.

Importable without vLLM. `ops` registers the `torch.library` custom ops ``vllm_armor::factored_linear``
and ``vllm_armor::sparse24_linear``; `select` decides which kernel a layer uses.
"""

from vllm_armor.kernels.blockdiag import armor_linear_dense_core, block_diag_matmul
from vllm_armor.kernels.select import KERNEL_ENV, KernelChoice, choose_kernel

__all__ = ["KERNEL_ENV", "KernelChoice", "armor_linear_dense_core", "block_diag_matmul", "choose_kernel"]
