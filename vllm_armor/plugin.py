"""vLLM integration: the `armor` quantization method (config and registration).

Imported only by `vllm_armor.register()` (vLLM's `vllm.general_plugins` entry point), never at package
import. The format comes from `vllm_armor.checkpoint_format`, loading and dispatch from
`vllm_armor.linear_method`, compute from `vllm_armor.kernels`.
Every vLLM name used here and in `linear_method.py` is listed in `vllm_armor.vllm_api` (tested).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from vllm_armor import checkpoint_format as fmt
from vllm_armor.checkpoint_format import ArmorFormatError, CheckpointIndex
from vllm_armor.kernels import KERNEL_ENV, compile_key
from vllm_armor.linear_method import ArmorLinearMethod

from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod  # isort: skip
from vllm.model_executor.layers.quantization import register_quantization_config  # isort: skip
from vllm.model_executor.layers.quantization.base_config import (  # isort: skip
    QuantizationConfig,
    QuantizeMethodBase,
)

logger = logging.getLogger("vllm.armor")


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------


class ArmorConfig(QuantizationConfig):
    """config.json's quantization_config for ARMOR checkpoints (format in docs/FORMAT.md)."""

    def __init__(self, quant_cfg: dict[str, Any]) -> None:
        super().__init__()
        self.quant_cfg = fmt.validate_quant_config(quant_cfg)
        self.pruned_modules: set[str] = set(self.quant_cfg["pruned_modules"])
        # Read by maybe_update_config from the safetensors headers (names, shapes, dtypes) and config.json's dtype;
        # handed to every ArmorLinearMethod, which reads nothing else of this config.
        self.index: CheckpointIndex | None = None
        self.model_dir: str | None = None
        self.served_modules: set[str] = set()  # pruned modules given to an ArmorLinearMethod (get_quant_method)
        self._all_served_checked = False

    def __repr__(self) -> str:
        return (
            f"ArmorConfig(method={self.quant_cfg.get('method')}, block_size={self.quant_cfg.get('block_size')}, "
            f"pruned_modules={len(self.pruned_modules)})"
        )

    @classmethod
    def get_name(cls) -> str:
        return fmt.QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # the dense-fold path runs anywhere; sparse24 checks its own requirements

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # read from config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ArmorConfig:
        return cls(config)

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        """Read the safetensors headers (names, shapes, dtypes; no data) so that layers can be created with
        their exact ARMOR shapes and missing tensors are reported before any weight is loaded."""
        self.model_dir = model_name
        folder = _local_dir(model_name, revision)
        if folder is None:
            return  # get_quant_method refuses the first pruned layer: no headers
        # every file checked against its size (a damaged one names itself), then `check_checkpoint`
        self.index = CheckpointIndex.read(folder, self.quant_cfg["pruned_modules"])

    def check_all_served(self) -> None:
        """Every module of pruned_modules became an ARMOR layer of the model: a listed module that is not a linear of
        the model is refused, not ignored. The model is complete once weights load: the linear methods call this
        before their first tensor, and it runs its check once."""
        if self._all_served_checked or _pipeline_parallel():
            return  # done, or other ranks hold the other layers
        self._all_served_checked = True
        if self.index is not None:
            self.index.check_served(self.served_modules)

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        if self.index is not None:
            self.index = self.index.renamed(hf_to_vllm_mapper.map_name, hf_to_vllm_mapper.apply_list)
        self.pruned_modules = set(hf_to_vllm_mapper.apply_list(sorted(self.pruned_modules)))

    def shard_modules(self, prefix: str) -> list[str]:
        """Checkpoint module names behind a vLLM layer (q/k/v for qkv_proj, gate/up for gate_up_proj)."""
        base, _, last = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(last)
        if not parts:
            return [prefix]
        return [f"{base}.{p}" if base else p for p in parts]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None  # embeddings, lm_head, attention: vLLM's defaults
        shards = self.shard_modules(prefix)
        pruned = [s in self.pruned_modules for s in shards]
        if all(pruned):
            if self.index is None:
                raise ArmorFormatError(f"ARMOR needs the checkpoint's safetensors headers; none were found (model "
                                       f"directory {self.model_dir!r})")
            self.served_modules.update(shards)
            return ArmorLinearMethod(self.index, prefix, shards, before_loading=self.check_all_served)
        if any(pruned):
            dense = [s for s, p in zip(shards, pruned, strict=True) if not p]
            raise ArmorFormatError(
                f"fused layer '{prefix}' is only partly pruned: {dense} are not in quantization_config."
                f"pruned_modules while {[s for s, p in zip(shards, pruned, strict=True) if p]} are; prune all or none"
            )
        return UnquantizedLinearMethod()


def _pipeline_parallel() -> bool:
    from vllm.distributed import get_pp_group

    try:
        return get_pp_group().world_size > 1
    except AssertionError:  # no process group (a unit test): one rank
        return False


def _local_dir(model: str, revision: str | None) -> Path | None:
    """The checkpoint folder: ``model`` itself, or a hub id's snapshot that vLLM has already downloaded."""
    path = Path(model)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - any failure means "not available locally"
        logger.warning("cannot locate the files of %s locally: %s", model, exc)
        return None


# ---------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------


def _add_kernel_env_to_compile_key() -> None:
    """vLLM's torch.compile cache key hashes the vLLM env vars it knows, not the quantization config or
    other variables. The kernel choice changes the traced graph (vLLM's GEMM vs our custom op), so make
    VLLM_ARMOR_KERNEL one of the hashed variables: switching it then compiles afresh instead of reusing a
    stale graph. (This also silences vLLM's "unknown VLLM_* variable" warning.)"""
    import vllm.envs as envs
    from vllm.platforms import current_platform

    envs.environment_variables.setdefault(KERNEL_ENV, lambda: compile_key(current_platform.is_cpu()))


_REGISTERED = False


def register_armor() -> None:
    """Register the `armor` quantization method with vLLM; safe to call any number of times."""
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    _add_kernel_env_to_compile_key()
    if fmt.QUANT_METHOD not in QUANTIZATION_METHODS or not _is_ours():
        register_quantization_config(fmt.QUANT_METHOD)(ArmorConfig)
    _REGISTERED = True


def _is_ours() -> bool:
    from vllm.model_executor.layers.quantization import get_quantization_config

    try:
        return get_quantization_config(fmt.QUANT_METHOD) is ArmorConfig
    except (ValueError, KeyError):
        return False
