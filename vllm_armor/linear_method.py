"""`ArmorLinearMethod`: loads one vLLM linear layer's ARMOR tensors and dispatches to a kernel.

Loading: `create_weights` sizes flat loading parameters from the safetensors headers of the checkpoint's
`CheckpointIndex` (checked with the format's `check_shapes`, sharded by `tensor_parallel.LayerLayout`); vLLM's
loader fills them shard by shard, each tensor checked against its header (`CheckpointIndex.check_loaded`). After
loading, the tensors are validated (`CheckpointIndex.validate`), a kernel is chosen from
`vllm_armor.kernels.KERNELS` and builds its own parameters; the loading parameters are dropped. Compute is the
kernel's `apply`. The method reads the index (immutable) and nothing of the plugin's config: `vllm_armor.plugin`
imports this module, never the other way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from vllm_armor import checkpoint_format as fmt
from vllm_armor.checkpoint_format import ArmorFormatError, CheckpointIndex
from vllm_armor.kernels import KERNEL_ENV, KERNELS, ArmorKernel, LayerSpec, build_kernel
from vllm_armor.tensor_parallel import LayerLayout

from vllm.model_executor.layers.linear import (  # isort: skip
    ColumnParallelLinear,
    LinearBase,
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.parameter import BasevLLMParameter  # isort: skip

# A child of "vllm" so that vLLM's logging configuration prints it next to its own lines.
logger = logging.getLogger("vllm.armor")
_LOGGED_CHOICES: set[str] = set()


def _loader_ids(layer: LinearBase, n: int) -> list[str | int | None]:
    if isinstance(layer, QKVParallelLinear):
        return ["q", "k", "v"]
    if isinstance(layer, MergedColumnParallelLinear):
        return list(range(n))
    return [None]


def _row_ranks(layer: LinearBase, n: int) -> list[int]:
    if isinstance(layer, QKVParallelLinear):
        kv_rank = layer.tp_rank // layer.num_kv_head_replicas
        return [layer.tp_rank, kv_rank, kv_rank]
    if isinstance(layer, RowParallelLinear) or not isinstance(layer, ColumnParallelLinear):
        return [0] * n
    return [layer.tp_rank] * n


class ArmorLinearMethod(LinearMethodBase):
    """Loads ARMOR tensors (core_values, core_meta, armor_a, armor_b) and computes A (core (B x)) + bias."""

    def __init__(self, index: CheckpointIndex, prefix: str, shard_modules: list[str],
                 before_loading: Callable[[], None] | None = None) -> None:
        """``index``: the checkpoint's headers and model dtype; ``shard_modules``: the checkpoint modules behind this
        layer (q/k/v, gate/up when fused); ``before_loading``: the plugin's model-wide check, called before the layer's
        first tensor (it runs once for the model)."""
        self.index = index
        self.prefix = prefix
        self.shard_modules = shard_modules
        self.before_loading = before_loading
        self.kernel: ArmorKernel | None = None

    # -- create ------------------------------------------------------------------------------------

    def _layout(self, layer: LinearBase, input_size: int, in_pp: int, out_parts: list[int]) -> LayerLayout:
        n = len(self.shard_modules)
        loader_ids = _loader_ids(layer, n)
        if len(loader_ids) != n or len(out_parts) != n:
            raise ArmorFormatError(f"layer '{self.prefix}' has {len(out_parts)} output parts but packs "
                                   f"{self.shard_modules}")
        shapes = [self.index.shapes(m, input_size) for m in self.shard_modules]
        self._check_shards_agree(shapes)
        row_parallel = isinstance(layer, RowParallelLinear)
        col_rank = getattr(layer, "tp_rank", 0) if row_parallel else 0
        values_dtype = self.index.values_dtype(self.shard_modules[0])
        layout = LayerLayout(self.prefix, row_parallel, in_pp, col_rank, values_dtype)
        for module, lid, rows, rank, sh in zip(self.shard_modules, loader_ids, out_parts, _row_ranks(layer, n),
                                               shapes, strict=True):
            if (rank + 1) * rows > sh.d_out:
                raise ArmorFormatError(
                    f"ARMOR tensor '{fmt.tensor_name(module, fmt.CORE_VALUES)}' has {sh.d_out} rows, the layer "
                    f"needs rows {rank * rows}..{(rank + 1) * rows} on this rank"
                )
            layout.add_shard(module, lid, rows, rank, (sh.block_out, sh.block_in))
        return layout

    def _check_shards_agree(self, shapes: list[fmt.LinearShapes]) -> None:
        """The shards of a fused layer (q/k/v, gate/up) must agree on dtypes and on carrying A/B: name the shard that
        differs from the first one, and how."""
        first, first_shape = self.shard_modules[0], shapes[0]
        for module, shape in zip(self.shard_modules[1:], shapes[1:], strict=True):
            if shape.has_ab != first_shape.has_ab:
                has, lacks = (module, first) if shape.has_ab else (first, module)
                raise ArmorFormatError(f"'{lacks}' carries no A/B (armor_a/armor_b) while '{has}' of the same fused "
                                       f"layer '{self.prefix}' does: the shards of a fused layer must agree")
            for suffix in (fmt.CORE_VALUES, fmt.ARMOR_A, fmt.ARMOR_B):
                mine, theirs = self.index.headers(module).get(suffix), self.index.headers(first).get(suffix)
                if mine is not None and theirs is not None and mine.dtype != theirs.dtype:
                    raise ArmorFormatError(
                        f"ARMOR tensor '{fmt.tensor_name(module, suffix)}' is {mine.dtype} while "
                        f"'{fmt.tensor_name(first, suffix)}' of the same fused layer '{self.prefix}' is {theirs.dtype}")

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
        layout = self._layout(layer, input_size, input_size_per_partition, output_partition_sizes)
        layer.armor_layout = layout
        layer.armor_loaded = set()
        rows, cols = sum(output_partition_sizes), input_size_per_partition
        shapes = fmt.expected_shapes(rows, cols)
        self._add_param(layer, fmt.CORE_VALUES, torch.empty(shapes[fmt.CORE_VALUES], dtype=layout.values_dtype))
        self._add_param(layer, fmt.CORE_META, torch.empty(shapes[fmt.CORE_META], dtype=torch.uint8))
        if layout.has_ab:
            a_numel = sum(s.rows * s.block_out for s in layout.shards)
            b_numel = sum(cols * s.block_in for s in layout.shards)
            ab_dtype = self._ab_dtype()
            self._add_param(layer, fmt.ARMOR_A, torch.empty(a_numel, dtype=ab_dtype))
            self._add_param(layer, fmt.ARMOR_B, torch.empty(b_numel, dtype=ab_dtype))

    def _ab_dtype(self) -> torch.dtype:
        """The one dtype A and B of every shard are stored in (model dtype or float32), from the headers."""
        found = {(m, s): self.index.header(m, s).dtype for m in self.shard_modules for s in (fmt.ARMOR_A, fmt.ARMOR_B)}
        if len(set(found.values())) != 1:
            listed = ", ".join(f"{fmt.tensor_name(m, s)} {d}" for (m, s), d in found.items())
            raise ArmorFormatError(f"layer '{self.prefix}': A and B must share one dtype across shards ({listed})")
        return next(iter(found.values()))

    def _add_param(self, layer: torch.nn.Module, suffix: str, data: torch.Tensor) -> None:
        def loader(param: torch.nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
            self._load(layer, suffix, param, loaded, shard_id)

        layer.register_parameter(suffix, BasevLLMParameter(data=data, weight_loader=loader))

    # -- load --------------------------------------------------------------------------------------

    def _load(self, layer, suffix: str, param, loaded: torch.Tensor, shard_id) -> None:
        if not layer.armor_loaded and self.before_loading is not None:
            self.before_loading()  # the layer's first tensor: the model is built
        layout: LayerLayout = layer.armor_layout
        spec = layout.shard_for(shard_id)
        self.index.check_loaded(spec.module, suffix, loaded, into=param.data.dtype)  # checked, never cast
        src, dst = layout.slices(spec, suffix, param.data, loaded)
        dst.copy_(src)
        layer.armor_loaded.add((suffix, spec.loader_id))

    # -- after loading -----------------------------------------------------------------------------

    def _loaded_shards(self, layer) -> list[dict[str, torch.Tensor]]:
        """Every shard's format tensors, checked complete and valid."""
        layout: LayerLayout = layer.armor_layout
        params = {s: getattr(layer, s).data for s in fmt.TENSOR_SUFFIXES if hasattr(layer, s)}
        shards = []
        for spec in layout.shards:
            for suffix in params:
                if (suffix, spec.loader_id) not in layer.armor_loaded:
                    raise ArmorFormatError(
                        f"ARMOR tensor '{fmt.tensor_name(spec.module, suffix)}' was never loaded "
                        f"(missing from the checkpoint files of layer '{self.prefix}')"
                    )
            tensors = layout.shard_tensors(spec, params)
            self.index.validate(spec.module, tensors, (spec.rows, layout.cols), serving_dtype=layer.params_dtype)
            shards.append(tensors)
        return shards

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        shards = self._loaded_shards(layer)
        layout: LayerLayout = layer.armor_layout
        spec = LayerSpec(layer.core_values.device, layer.params_dtype, tuple(s.rows for s in layout.shards),
                         layout.cols, layout.has_ab)
        self.kernel, reason = build_kernel(layer, spec, shards, self.prefix)
        _log_choice_once(self.kernel.name, reason)
        for suffix in fmt.TENSOR_SUFFIXES:
            if hasattr(layer, suffix):
                delattr(layer, suffix)

    # -- forward -----------------------------------------------------------------------------------

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.kernel.apply(layer, x, bias)


def _log_choice_once(kernel: str, reason: str) -> None:
    if kernel in _LOGGED_CHOICES:
        return
    _LOGGED_CHOICES.add(kernel)
    logger.info("ARMOR kernel: %s (%s); set %s=%s to override", kernel, reason, KERNEL_ENV,
                "|".join(k.name for k in KERNELS))
