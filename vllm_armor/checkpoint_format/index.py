"""`CheckpointIndex`: what a reader knows of a checkpoint before it reads any tensor (its safetensors headers, its
model dtype, the listed modules), checked once, and the checks of the tensors the reader then loads. Both readers
use it, the vLLM plugin (`vllm_armor.plugin` / `linear_method`) and the transformers quantizer; it imports no vLLM.
Immutable: the vLLM plugin's renaming (`renamed`) makes a new index."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_armor.checkpoint_format.files import config_dtype, read_config, read_headers
from vllm_armor.checkpoint_format.headers import TensorInfo, read_header
from vllm_armor.checkpoint_format.names import CORE_VALUES, ArmorFormatError, module_tensors, tensor_error, tensor_name
from vllm_armor.checkpoint_format.shapes import LinearShapes, check_shapes
from vllm_armor.checkpoint_format.validation import check_checkpoint, not_in_model, validate_linear


@dataclass(frozen=True)
class CheckpointIndex:
    """The headers (tensor name -> shape, dtype, file) of a checkpoint whose config lists ``pruned_modules``, already
    checked by `check_checkpoint`; ``model_dtype`` is config.json's dtype (the one core values are stored in)."""

    folder: Path
    tensors: Mapping[str, TensorInfo]
    pruned_modules: frozenset[str]
    model_dtype: torch.dtype | None

    @classmethod
    def read(cls, folder: Path, pruned_modules: Iterable[str], files: Sequence[Path] | None = None) -> CheckpointIndex:
        """Read and check the headers of ``files`` (default: the folder's weight files, each checked against its size:
        a damaged one names itself) and config.json's dtype."""
        folder = Path(folder)
        if files:
            tensors: dict[str, TensorInfo] = {}
            for file in files:
                tensors.update(read_header(Path(file)))
        else:
            tensors = read_headers(folder)
        model_dtype = config_dtype(read_config(folder))
        pruned = frozenset(pruned_modules)
        check_checkpoint(tensors, pruned, model_dtype)
        return cls(folder, tensors, pruned, model_dtype)

    def renamed(self, map_name: Callable[[str], str | None],
                map_modules: Callable[[list[str]], list[str]]) -> CheckpointIndex:
        """The same index under a reader's names (a tensor mapped to None is dropped)."""
        tensors = {new: info for name, info in self.tensors.items() if (new := map_name(name)) is not None}
        pruned = frozenset(map_modules(sorted(self.pruned_modules)))
        return CheckpointIndex(self.folder, tensors, pruned, self.model_dtype)

    def headers(self, module: str) -> dict[str, TensorInfo]:
        """suffix -> header of every format tensor of ``module``."""
        return {s: self.tensors[name] for s, name in module_tensors(module, self.tensors).items()}

    def header(self, module: str, suffix: str) -> TensorInfo:
        return self.tensors[tensor_name(module, suffix)]

    def values_dtype(self, module: str) -> torch.dtype:
        return self.header(module, CORE_VALUES).dtype

    def shapes(self, module: str, d_in: int | None = None) -> LinearShapes:
        """The shapes of ``module`` from its headers, checked against the layer's input dimension when known; the
        error names the checkpoint folder."""
        try:
            return check_shapes(module, {s: info.shape for s, info in self.headers(module).items()}, d_in=d_in)
        except ArmorFormatError as err:
            raise ArmorFormatError(f"{err} in {self.folder}") from None

    def check_loaded(self, module: str, suffix: str, loaded: torch.Tensor, into: torch.dtype | None = None) -> None:
        """A tensor as a loader hands it over: loaded at all, with its header's shape and stored dtype (types are
        checked, never cast), into a parameter of that dtype (``into``) when the reader has one."""
        stored = self.header(module, suffix)
        if loaded.is_meta:
            raise tensor_error(module, suffix, "was not loaded")
        if tuple(loaded.shape) != stored.shape:
            raise tensor_error(module, suffix, f"expected shape {stored.shape}, got {tuple(loaded.shape)}")
        if loaded.dtype != stored.dtype or (into is not None and into != stored.dtype):
            target = f" into a {into} parameter" if into is not None else ""
            raise tensor_error(module, suffix, f"stored as {stored.dtype}, loaded as {loaded.dtype}{target}")

    def validate(self, module: str, tensors: Mapping[str, torch.Tensor], expected_shape: tuple[int, int] | None,
                 serving_dtype: torch.dtype | None) -> LinearShapes:
        """`validate_linear` of a loaded module, in the checkpoint's model dtype and the reader's ``serving_dtype``."""
        return validate_linear(module, tensors, expected_shape=expected_shape, model_dtype=self.model_dtype,
                               serving_dtype=serving_dtype)

    def check_served(self, served: Iterable[str]) -> None:
        """Every listed module is among the ``served`` linear layers of the reader's model; else `not_in_model`."""
        missing = self.pruned_modules - set(served)
        if missing:
            raise not_in_model(missing)
