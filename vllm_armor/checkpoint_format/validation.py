"""Validation of one linear's loaded tensors (`validate_linear`) and of a whole checkpoint's headers
(`check_checkpoint`): the checks every reader runs, in the order of docs/FORMAT.md "Validation"."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from vllm_armor.checkpoint_format.codec import unpack_mask
from vllm_armor.checkpoint_format.headers import TensorInfo
from vllm_armor.checkpoint_format.names import (
    ARMOR_A,
    ARMOR_B,
    CORE_META,
    CORE_VALUES,
    GROUP,
    KEEP,
    TENSOR_SUFFIXES,
    ArmorFormatError,
    module_tensors,
    tensor_error,
)
from vllm_armor.checkpoint_format.numerics import check_numerics
from vllm_armor.checkpoint_format.shapes import LinearShapes, check_dtypes, check_shapes


def validate_linear(
    module: str,
    tensors: Mapping[str, torch.Tensor],
    expected_shape: tuple[int, int] | None = None,
    model_dtype: torch.dtype | None = None,
    serving_dtype: torch.dtype | None = None,
) -> LinearShapes:
    """Validate the ARMOR tensors of one pruned linear; return its shapes.

    ``tensors`` maps suffixes (``core_values``, ``core_meta``, ``armor_a``, ``armor_b``) to tensors.
    ``expected_shape`` is (d_out, d_in) of the dense layer when known; ``model_dtype`` the checkpoint's dtype
    (config.json) and ``serving_dtype`` the dtype the reader computes in, when known: the layer must be finite in
    both. Raises ArmorFormatError naming the offending tensor or layer.
    """
    check_dtypes(module, {s: t.dtype for s, t in tensors.items()}, model_dtype)
    layer = expected_shape or (None, None)
    shapes = check_shapes(module, {s: tuple(t.shape) for s, t in tensors.items()}, *layer)
    kept = unpack_mask(tensors[CORE_META]).reshape(shapes.d_out, shapes.d_in // GROUP, GROUP).sum(-1)
    bad = kept != KEEP
    if bool(bad.any()):
        row, group = (int(i) for i in bad.nonzero()[0])
        raise tensor_error(module, CORE_META,
                           f"row {row}, group {group} keeps {int(kept[row, group])} of 4 inputs (2:4 needs exactly 2)")
    for suffix in (CORE_VALUES, ARMOR_A, ARMOR_B):
        if suffix in tensors and not bool(torch.isfinite(tensors[suffix]).all()):
            raise tensor_error(module, suffix, "contains NaN or Inf")
    check_numerics(module, tensors, [d for d in (model_dtype, serving_dtype) if d is not None])
    return shapes


def not_in_model(missing: Iterable[str]) -> ArmorFormatError:
    """The error of both readers for listed modules that are not linear layers of the model."""
    missing = sorted(missing)
    return ArmorFormatError(f"pruned module {missing[0]!r} (quantization_config.pruned_modules) is not a linear "
                            f"layer of the model ({len(missing)} such module{'s' if len(missing) > 1 else ''})")


def check_checkpoint(infos: Mapping[str, TensorInfo], pruned_modules: Iterable[str],
                     model_dtype: torch.dtype | None = None) -> dict[str, LinearShapes]:
    """The checks every reader runs on the headers of a whole checkpoint before any tensor is read: config and
    tensors agree both ways (every listed module has its tensors, every ARMOR tensor belongs to a listed module,
    no listed module keeps a dense weight) and every listed module's dtypes and shapes. Returns module -> shapes."""
    listed = set(pruned_modules)
    for name in sorted(infos):
        module, _, suffix = name.rpartition(".")
        if suffix in TENSOR_SUFFIXES and module not in listed:
            raise ArmorFormatError(f"ARMOR tensor '{name}' ({infos[name].where}) belongs to no module in "
                                   "quantization_config.pruned_modules")
        if suffix == "weight" and module in listed:
            raise ArmorFormatError(f"pruned module '{module}' also has a dense tensor '{name}' ({infos[name].where})")
    shapes = {}
    for module in sorted(listed):
        headers = {s: infos[name] for s, name in module_tensors(module, infos).items()}
        check_dtypes(module, {s: i.dtype for s, i in headers.items()}, model_dtype)
        shapes[module] = check_shapes(module, {s: i.shape for s, i in headers.items()})
    return shapes
