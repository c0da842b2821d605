"""Size of a checkpoint against its dense model (the report's and config.json's ``cost``, the model card)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from vllm_armor.checkpoint_format.headers import TensorInfo
from vllm_armor.checkpoint_format.names import ARMOR_A, ARMOR_B, CORE_VALUES, TENSOR_SUFFIXES, tensor_name


@dataclass(frozen=True)
class Footprint:
    """Parameter and byte counts of a checkpoint (from tensors' or headers' shapes and dtypes)."""

    core_values: int  # kept values of all pruned linears
    ab_params: int  # entries of all A and B blocks
    checkpoint_bytes: int  # every tensor as stored
    dense_bytes: int  # the same model with every pruned linear as a dense weight in its values' dtype

    @property
    def overhead(self) -> float:
        """A and B parameters per kept core value."""
        return self.ab_params / self.core_values if self.core_values else 0.0

    @property
    def bytes_ratio(self) -> float:
        return self.checkpoint_bytes / self.dense_bytes if self.dense_bytes else 0.0

    def as_dict(self) -> dict:
        """What the report and config.json record: A+B per kept value, weight bytes vs the dense model."""
        return {"ab_overhead": round(self.overhead, 6), "weight_bytes": self.checkpoint_bytes,
                "dense_bytes": self.dense_bytes, "bytes_ratio": round(self.bytes_ratio, 6)}


def footprint(infos: Mapping[str, TensorInfo], pruned_modules: list[str]) -> Footprint:
    def nbytes(info: TensorInfo) -> int:
        return math.prod(info.shape) * info.dtype.itemsize

    total = sum(nbytes(i) for i in infos.values())
    armor = {tensor_name(m, s) for m in pruned_modules for s in TENSOR_SUFFIXES}
    values = [infos[tensor_name(m, CORE_VALUES)] for m in pruned_modules if tensor_name(m, CORE_VALUES) in infos]
    ab = [infos[tensor_name(m, s)] for m in pruned_modules for s in (ARMOR_A, ARMOR_B) if tensor_name(m, s) in infos]
    dense = total - sum(nbytes(i) for n, i in infos.items() if n in armor) + sum(2 * nbytes(i) for i in values)
    return Footprint(sum(math.prod(i.shape) for i in values), sum(math.prod(i.shape) for i in ab), total, dense)
