"""vLLM integration: the `armor` quantization method (config, linear method, registration).

Imported only by `vllm_armor.register()` (vLLM's `vllm.general_plugins` entry point), never at package
import. Tensor names, packing and validation come from `vllm_armor.checkpoint_format`; compute from
`vllm_armor.kernels`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_armor import checkpoint_format as cf
from vllm_armor.checkpoint_format import ArmorFormatError
from vllm_armor.kernels import ops
from vllm_armor.kernels.select import KERNEL_ENV, KernelChoice, choose_kernel
from vllm_armor.kernels.sparse24 import compress_core, sparse24_shape_ok
from vllm_armor.safetensors_index import TensorInfo, read_tensor_index

from vllm.model_executor.layers.linear import (  # isort: skip
    ColumnParallelLinear,
    LinearBase,
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import register_quantization_config  # isort: skip
from vllm.model_executor.layers.quantization.base_config import (  # isort: skip
    QuantizationConfig,
    QuantizeMethodBase,
)
from vllm.model_executor.parameter import BasevLLMParameter  # isort: skip

# A child of "vllm" so that vLLM's logging configuration prints it next to its own lines.
logger = logging.getLogger("vllm.armor")

ARMOR_SUFFIXES = (cf.CORE_VALUES, cf.CORE_META, cf.ARMOR_A, cf.ARMOR_B)
_LOGGED_CHOICES: set[str] = set()


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------


class ArmorConfig(QuantizationConfig):
    """config.json's quantization_config for ARMOR checkpoints (format in docs/FORMAT.md)."""

    def __init__(self, quant_cfg: dict[str, Any]) -> None:
        super().__init__()
        self.quant_cfg = cf.validate_quant_config(quant_cfg)
        self.pruned_modules: set[str] = set(self.quant_cfg["pruned_modules"])
        # Filled by maybe_update_config from the safetensors headers: name -> (shape, dtype).
        self.tensor_index: dict[str, TensorInfo] = {}
        self.model_dir: str | None = None

    def __repr__(self) -> str:
        return (
            f"ArmorConfig(method={self.quant_cfg.get('method')}, block_size={self.quant_cfg.get('block_size')}, "
            f"pruned_modules={len(self.pruned_modules)})"
        )

    @classmethod
    def get_name(cls) -> str:
        return cf.QUANT_METHOD

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
        self.tensor_index = read_tensor_index(model_name, revision)

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        mapped = {}
        for name, info in self.tensor_index.items():
            new = hf_to_vllm_mapper.map_name(name)
            if new is not None:
                mapped[new] = info
        self.tensor_index = mapped
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
            return ArmorLinearMethod(self, prefix, shards)
        if any(pruned):
            dense = [s for s, p in zip(shards, pruned, strict=True) if not p]
            raise ArmorFormatError(
                f"fused layer '{prefix}' is only partly pruned: {dense} are not in quantization_config."
                f"pruned_modules while {[s for s, p in zip(shards, pruned, strict=True) if p]} are; prune all or none"
            )
        return UnquantizedLinearMethod()


# ---------------------------------------------------------------------------------------------------
# Per-layer layout
# ---------------------------------------------------------------------------------------------------


@dataclass
class ShardSpec:
    """One checkpoint linear (e.g. k_proj) inside a vLLM layer (e.g. qkv_proj) on this rank."""

    module: str  # checkpoint module name
    loader_id: str | int | None  # shard id vLLM passes to the weight loader
    rows: int  # output rows of this shard on this rank
    row_offset: int  # first row of this shard in the layer's (rank-local) output
    row_rank: int  # which slice of the checkpoint tensor's rows this rank holds
    block_out: int | None
    block_in: int | None
    a_offset: int = 0  # offsets into the flat armor_a / armor_b parameters
    b_offset: int = 0


@dataclass
class LayerLayout:
    prefix: str
    row_parallel: bool
    cols: int  # input columns on this rank
    col_rank: int
    values_dtype: torch.dtype
    shards: list[ShardSpec] = field(default_factory=list)

    @property
    def has_ab(self) -> bool:
        return self.shards[0].block_out is not None

    def shard_for(self, loader_id: str | int | None) -> ShardSpec:
        for spec in self.shards:
            if spec.loader_id == loader_id:
                return spec
        known = [s.loader_id for s in self.shards]
        raise ArmorFormatError(
            f"layer '{self.prefix}': got a weight for shard {loader_id!r}, expected one of {known} "
            "(checkpoints with already fused q/k/v or gate/up tensors are not supported)"
        )


def _loader_ids(layer: LinearBase, n: int) -> list[str | int | None]:
    if isinstance(layer, QKVParallelLinear):
        return ["q", "k", "v"]
    if isinstance(layer, MergedColumnParallelLinear):
        return list(range(n))
    return [None]


def _row_ranks(layer: LinearBase, loader_ids: list) -> list[int]:
    if isinstance(layer, QKVParallelLinear):
        kv_rank = layer.tp_rank // layer.num_kv_head_replicas
        return [layer.tp_rank, kv_rank, kv_rank]
    if isinstance(layer, RowParallelLinear) or not isinstance(layer, ColumnParallelLinear):
        return [0] * len(loader_ids)
    return [layer.tp_rank] * len(loader_ids)


# ---------------------------------------------------------------------------------------------------
# Linear method
# ---------------------------------------------------------------------------------------------------


class ArmorLinearMethod(LinearMethodBase):
    """Loads ARMOR tensors (core_values, core_meta, armor_a, armor_b) and computes A (core (B x)) + bias."""

    def __init__(self, config: ArmorConfig, prefix: str, shard_modules: list[str]) -> None:
        self.config = config
        self.prefix = prefix
        self.shard_modules = shard_modules
        self.kernel: KernelChoice | None = None
        self._dense: UnquantizedLinearMethod | None = None

    # -- create ------------------------------------------------------------------------------------

    def _info(self, module: str, suffix: str) -> TensorInfo | None:
        return self.config.tensor_index.get(cf.tensor_name(module, suffix))

    def _require(self, module: str, suffix: str) -> TensorInfo:
        info = self._info(module, suffix)
        if info is None:
            where = f" in {self.config.model_dir}" if self.config.model_dir else ""
            raise ArmorFormatError(f"ARMOR tensor '{cf.tensor_name(module, suffix)}' is missing{where}")
        return info

    def _block_sizes(self, module: str) -> tuple[int | None, int | None]:
        a, b = self._info(module, cf.ARMOR_A), self._info(module, cf.ARMOR_B)
        if (a is None) != (b is None):
            missing = cf.ARMOR_B if b is None else cf.ARMOR_A
            raise ArmorFormatError(
                f"ARMOR tensor '{cf.tensor_name(module, missing)}' is missing (A and B come together)"
            )
        if a is None:
            return None, None
        for name, info in ((cf.ARMOR_A, a), (cf.ARMOR_B, b)):
            if len(info.shape) != 3 or info.shape[1] != info.shape[2]:
                raise ArmorFormatError(
                    f"ARMOR tensor '{cf.tensor_name(module, name)}': expected (n_blocks, bs, bs), got {info.shape}"
                )
        return a.shape[1], b.shape[1]

    def _check_full_shape(self, module: str, d_out: int, d_in: int) -> None:
        values, meta = self._require(module, cf.CORE_VALUES), self._require(module, cf.CORE_META)
        if values.shape != (d_out, d_in // 2):
            raise ArmorFormatError(
                f"ARMOR tensor '{cf.tensor_name(module, cf.CORE_VALUES)}': expected shape {(d_out, d_in // 2)} "
                f"for a {d_out}x{d_in} layer, got {values.shape}"
            )
        if meta.shape != (d_out, d_in // 8):
            raise ArmorFormatError(
                f"ARMOR tensor '{cf.tensor_name(module, cf.CORE_META)}': expected shape {(d_out, d_in // 8)} "
                f"for a {d_out}x{d_in} layer, got {meta.shape}"
            )
        a_info, b_info = self._info(module, cf.ARMOR_A), self._info(module, cf.ARMOR_B)
        for suffix, info, dim, side in ((cf.ARMOR_A, a_info, d_out, "output"), (cf.ARMOR_B, b_info, d_in, "input")):
            if info is not None and info.shape[0] * info.shape[1] != dim:
                raise ArmorFormatError(
                    f"ARMOR tensor '{cf.tensor_name(module, suffix)}': {info.shape[0]} blocks of {info.shape[1]} "
                    f"do not cover the {side} dimension {dim} (block size must divide it)"
                )

    def _layout(self, layer: LinearBase, input_size: int, in_pp: int, out_parts: list[int]) -> LayerLayout:
        row_parallel = isinstance(layer, RowParallelLinear)
        loader_ids = _loader_ids(layer, len(self.shard_modules))
        if len(loader_ids) != len(self.shard_modules) or len(out_parts) != len(self.shard_modules):
            raise ArmorFormatError(
                f"layer '{self.prefix}' has {len(out_parts)} output parts but packs {self.shard_modules}"
            )
        row_ranks = _row_ranks(layer, loader_ids)
        tp_rank = getattr(layer, "tp_rank", 0)
        dtypes = {self._require(m, cf.CORE_VALUES).dtype for m in self.shard_modules}
        if len(dtypes) != 1:
            raise ArmorFormatError(f"layer '{self.prefix}': core_values of {self.shard_modules} differ in dtype")
        layout = LayerLayout(self.prefix, row_parallel, in_pp, tp_rank if row_parallel else 0, dtypes.pop())
        offset = a_off = b_off = 0
        for module, lid, rows, rank in zip(self.shard_modules, loader_ids, out_parts, row_ranks, strict=True):
            full_rows = self._require(module, cf.CORE_VALUES).shape[0]
            self._check_full_shape(module, full_rows, input_size)
            if (rank + 1) * rows > full_rows:
                raise ArmorFormatError(
                    f"ARMOR tensor '{cf.tensor_name(module, cf.CORE_VALUES)}' has {full_rows} rows, the layer "
                    f"needs rows {rank * rows}..{(rank + 1) * rows} on this rank"
                )
            bo, bi = self._block_sizes(module)
            if row_parallel:
                cf.check_input_shard(module, in_pp, bi)
            else:
                cf.check_output_shard(module, rows, bo)
            spec = ShardSpec(module, lid, rows, offset, rank, bo, bi, a_off, b_off)
            if bo is not None:
                a_off += rows * bo
                b_off += in_pp * bi
            layout.shards.append(spec)
            offset += rows
        if len({s.block_out is None for s in layout.shards}) != 1:
            raise ArmorFormatError(f"layer '{self.prefix}': some of {self.shard_modules} carry A/B and some do not")
        return layout

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        if not self.config.tensor_index:
            raise ArmorFormatError(
                "ARMOR needs the checkpoint's safetensors headers; none were found "
                f"(model directory {self.config.model_dir!r})"
            )
        layout = self._layout(layer, input_size, input_size_per_partition, output_partition_sizes)
        layer.armor_layout = layout
        layer.armor_loaded = set()
        rows, cols = sum(output_partition_sizes), input_size_per_partition
        self._add_param(layer, cf.CORE_VALUES, torch.empty(rows, cols // 2, dtype=layout.values_dtype))
        self._add_param(layer, cf.CORE_META, torch.empty(rows, cols // 8, dtype=torch.uint8))
        if layout.has_ab:
            a_numel = sum(s.rows * s.block_out for s in layout.shards)
            b_numel = sum(cols * s.block_in for s in layout.shards)
            self._add_param(layer, cf.ARMOR_A, torch.empty(a_numel, dtype=torch.float32))
            self._add_param(layer, cf.ARMOR_B, torch.empty(b_numel, dtype=torch.float32))

    def _add_param(self, layer: torch.nn.Module, suffix: str, data: torch.Tensor) -> None:
        def loader(param: torch.nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
            self._load(layer, suffix, param, loaded, shard_id)

        layer.register_parameter(suffix, BasevLLMParameter(data=data, weight_loader=loader))

    # -- load --------------------------------------------------------------------------------------

    def _load(self, layer, suffix: str, param, loaded: torch.Tensor, shard_id) -> None:
        layout: LayerLayout = layer.armor_layout
        spec = layout.shard_for(shard_id)
        name = cf.tensor_name(spec.module, suffix)
        expected = self._require(spec.module, suffix).shape
        if tuple(loaded.shape) != expected:
            raise ArmorFormatError(f"ARMOR tensor '{name}': expected shape {expected}, got {tuple(loaded.shape)}")
        src, dst = self._slices(layout, spec, suffix, param.data, loaded)
        dst.copy_(src)
        layer.armor_loaded.add((suffix, spec.loader_id))

    @staticmethod
    def _slices(layout: LayerLayout, spec: ShardSpec, suffix: str, data: torch.Tensor, loaded: torch.Tensor):
        cols = layout.cols
        if suffix in (cf.CORE_VALUES, cf.CORE_META):
            per = 2 if suffix == cf.CORE_VALUES else 8
            src = loaded.narrow(0, spec.row_rank * spec.rows, spec.rows)
            src = src.narrow(1, layout.col_rank * cols // per, cols // per)
            return src, data.narrow(0, spec.row_offset, spec.rows)
        if suffix == cf.ARMOR_A:
            bs = spec.block_out
            n = spec.rows // bs
            src = loaded.narrow(0, spec.row_rank * n, n)
            return src, data.narrow(0, spec.a_offset, n * bs * bs).view(n, bs, bs)
        bs = spec.block_in
        n = cols // bs
        src = loaded.narrow(0, layout.col_rank * n, n)
        return src, data.narrow(0, spec.b_offset, n * bs * bs).view(n, bs, bs)

    # -- after loading -----------------------------------------------------------------------------

    def _shard_tensors(self, layer, spec: ShardSpec) -> dict[str, torch.Tensor]:
        layout: LayerLayout = layer.armor_layout
        cols = layout.cols
        t = {
            cf.CORE_VALUES: layer.core_values.data.narrow(0, spec.row_offset, spec.rows),
            cf.CORE_META: layer.core_meta.data.narrow(0, spec.row_offset, spec.rows),
        }
        if layout.has_ab:
            bo, bi = spec.block_out, spec.block_in
            t[cf.ARMOR_A] = layer.armor_a.data.narrow(0, spec.a_offset, spec.rows * bo).view(-1, bo, bo)
            t[cf.ARMOR_B] = layer.armor_b.data.narrow(0, spec.b_offset, cols * bi).view(-1, bi, bi)
        return t

    def _check_complete(self, layer) -> None:
        layout: LayerLayout = layer.armor_layout
        wanted = [cf.CORE_VALUES, cf.CORE_META] + ([cf.ARMOR_A, cf.ARMOR_B] if layout.has_ab else [])
        for spec in layout.shards:
            for suffix in wanted:
                if (suffix, spec.loader_id) not in layer.armor_loaded:
                    raise ArmorFormatError(
                        f"ARMOR tensor '{cf.tensor_name(spec.module, suffix)}' was never loaded "
                        f"(missing from the checkpoint files of layer '{self.prefix}')"
                    )

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self._check_complete(layer)
        layout: LayerLayout = layer.armor_layout
        shard_tensors = []
        for spec in layout.shards:
            tensors = self._shard_tensors(layer, spec)
            cf.validate_linear(spec.module, tensors, expected_shape=(spec.rows, layout.cols))
            shard_tensors.append(tensors)
        device = layer.core_values.device
        self.kernel, reason = choose_kernel(device)
        if self.kernel is KernelChoice.SPARSE24 and not all(
            sparse24_shape_ok(s.rows, layout.cols, layer.params_dtype) for s in layout.shards
        ):
            self.kernel, reason = KernelChoice.DENSE, "shape/dtype outside cuSPARSELt limits"
        _log_choice_once(self.kernel, reason)
        if self.kernel is KernelChoice.DENSE:
            self._fold_dense(layer, shard_tensors)
        else:
            self._keep_factored(layer, shard_tensors)
        for suffix in ARMOR_SUFFIXES:
            if hasattr(layer, suffix):
                delattr(layer, suffix)

    def _fold_dense(self, layer, shard_tensors: list[dict[str, torch.Tensor]]) -> None:
        weight = torch.cat([cf.reconstruct_weight(t, torch.float32) for t in shard_tensors], dim=0)
        layer.weight = torch.nn.Parameter(weight.to(layer.params_dtype), requires_grad=False)
        self._dense = UnquantizedLinearMethod()
        self._dense.process_weights_after_loading(layer)

    def _keep_factored(self, layer, shard_tensors: list[dict[str, torch.Tensor]]) -> None:
        dtype = layer.params_dtype
        cores = [cf.unpack_2to4(t[cf.CORE_VALUES].to(dtype), t[cf.CORE_META]) for t in shard_tensors]
        if self.kernel is KernelChoice.SPARSE24:
            cores = [compress_core(c) for c in cores]
        params = {f"armor_core_{i}": c for i, c in enumerate(cores)}
        if layer.armor_layout.has_ab:
            for i, t in enumerate(shard_tensors):
                params[f"armor_ablk_{i}"] = t[cf.ARMOR_A].to(dtype).contiguous()
                params[f"armor_bblk_{i}"] = t[cf.ARMOR_B].to(dtype).contiguous()
        for name, tensor in params.items():
            layer.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
        n = len(shard_tensors)
        layer.armor_n_shards = n
        layer.armor_out_sizes = [s.rows for s in layer.armor_layout.shards]

    # -- forward -----------------------------------------------------------------------------------

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self._dense is not None:
            return self._dense.apply(layer, x, bias)
        n = layer.armor_n_shards
        cores = [getattr(layer, f"armor_core_{i}") for i in range(n)]
        has_ab = layer.armor_layout.has_ab
        a = [getattr(layer, f"armor_ablk_{i}") for i in range(n)] if has_ab else []
        b = [getattr(layer, f"armor_bblk_{i}") for i in range(n)] if has_ab else []
        if self.kernel is KernelChoice.SPARSE24:
            return torch.ops.vllm_armor.sparse24_linear(x, cores, layer.armor_out_sizes, a, b, bias)
        return torch.ops.vllm_armor.factored_linear(x, cores, a, b, bias)


def _log_choice_once(kernel: KernelChoice, reason: str) -> None:
    if kernel.value in _LOGGED_CHOICES:
        return
    _LOGGED_CHOICES.add(kernel.value)
    logger.info("ARMOR kernel: %s (%s); set %s=dense|factored|sparse24 to override", kernel.value, reason, KERNEL_ENV)


# ---------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------


def _add_kernel_env_to_compile_key() -> None:
    """vLLM's torch.compile cache key hashes the vLLM env vars it knows, not the quantization config or
    other variables. The kernel choice changes the traced graph (vLLM's GEMM vs our custom op), so make
    VLLM_ARMOR_KERNEL one of the hashed variables: switching it then compiles afresh instead of reusing a
    stale graph. (This also silences vLLM's "unknown VLLM_* variable" warning.)"""
    import vllm.envs as envs

    envs.environment_variables.setdefault(KERNEL_ENV, lambda: os.environ.get(KERNEL_ENV, KernelChoice.AUTO.value))


_REGISTERED = False


def register_armor() -> None:
    """Register the `armor` quantization method with vLLM; safe to call any number of times."""
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    _add_kernel_env_to_compile_key()
    if cf.QUANT_METHOD not in QUANTIZATION_METHODS or not _is_ours():
        register_quantization_config(cf.QUANT_METHOD)(ArmorConfig)
    assert ops.factored_linear is not None  # custom ops registered by importing vllm_armor.kernels.ops
    _REGISTERED = True


def _is_ours() -> bool:
    from vllm.model_executor.layers.quantization import get_quantization_config

    try:
        return get_quantization_config(cf.QUANT_METHOD) is ArmorConfig
    except (ValueError, KeyError):
        return False
