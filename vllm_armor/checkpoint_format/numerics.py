"""Numerics of one linear (docs/FORMAT.md, Validation step 6): its tensors, its reconstruction and its outputs must be
finite in the dtypes it is stored and served in.

The output check needs a size of input. `ACTIVATION_BOUND` is the magnitude of one input activation that a layer must
turn into finite outputs: every stage of y = A (core (B x)) must stay below the dtype's largest value for an input
with one channel of that magnitude (the rest zero), which is exactly ``ACTIVATION_BOUND * max |entry|`` of B,
core @ B and A @ core @ B. The number: the largest activation SmolLM2-135M reaches at the input of any of its linears
on WikiText-2 is 3.2e3 (one channel of down_proj's input, a "massive activation"; q/k/v/gate/up inputs, behind an
RMSNorm, stay under 32), so 4096 is what a real model's own activations reach, rounded up to a power of two. It keeps
float16 serving of real checkpoints possible (SmolLM2's largest weight, 9.25, gives 3.8e4 < 65504) and refuses the
layers that only produce Inf/NaN: finite values so large that any real activation overflows the serving dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from vllm_armor.blockdiag import blockdiag_right
from vllm_armor.checkpoint_format.codec import decode_linear, reconstruct_weight
from vllm_armor.checkpoint_format.names import (
    ARMOR_A,
    ARMOR_B,
    CORE_VALUES,
    ArmorFormatError,
    tensor_error,
)

ACTIVATION_BOUND = 4096.0


def reconstruction_bound(tensors: Mapping[str, torch.Tensor]) -> float:
    """An upper bound of max |A @ core @ B| (float64): max row-sum |A| * max row-sum |core| * max |B|."""
    core = tensors[CORE_VALUES].double().abs().sum(dim=1).max().item()
    a, b = tensors.get(ARMOR_A), tensors.get(ARMOR_B)
    if a is None:
        return core
    return a.double().abs().sum(dim=2).max().item() * core * b.double().abs().max().item()


def _nonfinite_in(dtype: torch.dtype, tensor: torch.Tensor) -> bool:
    return not bool(torch.isfinite(tensor.to(dtype)).all())


def _largest_entries(tensors: Mapping[str, torch.Tensor], limit: float) -> list[tuple[str, str, float]]:
    """(tensor blamed, stage, max |entry|) of each stage of the layer's product in the order it is computed: B,
    core @ B, A @ core @ B (only the core without A/B). A stage whose cheap bound stays under ``limit`` reports the
    bound; only the others are computed (float64)."""
    values = tensors[CORE_VALUES].double()
    core_rows = values.abs().sum(dim=1).max().item()
    if ARMOR_A not in tensors:
        return [(CORE_VALUES, "the core", values.abs().max().item())]
    a, b = tensors[ARMOR_A].double(), tensors[ARMOR_B].double()
    b_max = b.abs().max().item()
    stages = [(ARMOR_B, "B", b_max)]
    core_b = core_rows * b_max
    if not core_b < limit:
        lin = decode_linear(tensors, torch.float64)
        core_b = blockdiag_right(lin.core, lin.b_blocks).abs().max().item()
    stages.append((CORE_VALUES, "core @ B", core_b))
    weight = a.abs().sum(dim=2).max().item() * core_rows * b_max
    if not weight < limit:
        weight = reconstruct_weight(tensors, torch.float64).abs().max().item()
    stages.append((ARMOR_A, "A @ core @ B", weight))
    return stages


def check_outputs(module: str, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype,
                  activation: float = ACTIVATION_BOUND) -> None:
    """Refuse a layer that turns an input of one channel of magnitude ``activation`` into a value beyond ``dtype``'s
    largest at some stage of its product; the error names the tensor whose stage overflows first."""
    largest = torch.finfo(dtype).max
    for suffix, stage, entry in _largest_entries(tensors, largest / activation):
        if not activation * entry < largest:
            raise tensor_error(module, suffix, f"the layer's output overflows {dtype} for an input of magnitude "
                                               f"{activation:g} (ACTIVATION_BOUND, docs/FORMAT.md): {stage} has "
                                               f"entries up to {entry:.3g}, {dtype} ends at {largest:.3g}")


def check_numerics(module: str, tensors: Mapping[str, torch.Tensor], dtypes: Iterable[torch.dtype]) -> None:
    """Refuse a layer whose tensors or reconstruction W_hat = A @ core @ B is not finite in one of ``dtypes``
    (the model dtype and the serving dtype): a value that overflows there, or a product that does, or outputs that
    do for inputs of the size real activations reach (`check_outputs`). Products are computed only when a cheap bound
    cannot rule an overflow out."""
    for dtype in dict.fromkeys(dtypes):
        for suffix in (CORE_VALUES, ARMOR_A, ARMOR_B):
            if suffix in tensors and _nonfinite_in(dtype, tensors[suffix]):
                raise tensor_error(module, suffix, f"has values that overflow {dtype} (NaN or Inf once cast)")
        bound = reconstruction_bound(tensors)
        if not (math.isfinite(bound) and bound < torch.finfo(dtype).max):
            if not bool(torch.isfinite(reconstruct_weight(tensors, dtype)).all()):
                raise ArmorFormatError(f"ARMOR layer '{module}': the reconstructed weight A @ core @ B is not finite "
                                       f"in {dtype} (overflow)")
        check_outputs(module, tensors, dtype)
