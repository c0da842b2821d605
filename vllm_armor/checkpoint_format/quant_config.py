"""config.json's ``quantization_config`` for ARMOR: its keys, the writer's `make_quant_config` and the readers'
`validate_quant_config`."""

from __future__ import annotations

from collections.abc import Mapping

from vllm_armor.checkpoint_format.footprint import Footprint
from vllm_armor.checkpoint_format.names import FORMAT_VERSION, QUANT_METHOD, SPARSITY, ArmorFormatError

# Keys of config.json's quantization_config and whether they are required.
QUANT_CONFIG_KEYS = {
    "quant_method": True,
    "format_version": True,
    "sparsity": True,
    "method": False,  # which pruning method produced the checkpoint (informational)
    "block_size": False,  # the requested block size, or "auto" (actual sizes come from tensor shapes)
    "max_overhead": False,  # with block_size "auto": the A+B budget per kept core value (informational)
    "cost": False,  # ab_overhead, weight_bytes, dense_bytes, bytes_ratio of the checkpoint (informational)
    "pruned_modules": True,  # full names of the pruned linear layers
}


def validate_quant_config(cfg: Mapping) -> dict:
    """Validate config.json's ``quantization_config`` for ARMOR; return a normalised copy."""
    if not isinstance(cfg, Mapping):
        raise ArmorFormatError(f"quantization_config must be a JSON object, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(QUANT_CONFIG_KEYS))
    if unknown:
        raise ArmorFormatError(f"quantization_config has unknown keys {unknown} (known: {sorted(QUANT_CONFIG_KEYS)})")
    missing = sorted(k for k, required in QUANT_CONFIG_KEYS.items() if required and k not in cfg)
    if missing:
        raise ArmorFormatError(f"quantization_config is missing keys {missing}")
    if cfg["quant_method"] != QUANT_METHOD:
        raise ArmorFormatError(f"quantization_config.quant_method is {cfg['quant_method']!r}, expected 'armor'")
    if cfg["format_version"] != FORMAT_VERSION:
        raise ArmorFormatError(
            f"quantization_config.format_version {cfg['format_version']!r} is not supported (this build reads "
            f"version {FORMAT_VERSION}); upgrade vllm-armor or re-export the checkpoint"
        )
    if cfg["sparsity"] != SPARSITY:
        raise ArmorFormatError(f"quantization_config.sparsity {cfg['sparsity']!r} is not supported (only '2:4')")
    pruned = cfg["pruned_modules"]
    if not isinstance(pruned, list) or not all(isinstance(m, str) for m in pruned):
        raise ArmorFormatError("quantization_config.pruned_modules must be a list of module names")
    return dict(cfg)


def make_quant_config(method: str, block_size: int | str | None, pruned_modules: list[str],
                      max_overhead: float | None = None, cost: Footprint | None = None) -> dict:
    cfg = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "sparsity": SPARSITY,
        "method": method,
        "block_size": block_size,
        "pruned_modules": sorted(pruned_modules),
    }
    if max_overhead is not None:
        cfg["max_overhead"] = max_overhead
    if cost is not None:
        cfg["cost"] = cost.as_dict()
    return cfg


def is_armor_config(config: Mapping) -> bool:
    return (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD
