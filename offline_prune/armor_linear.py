"""`ArmorLinear` lives in `vllm_armor.torch_module` (shared with the transformers quantizer); re-exported here."""

from vllm_armor.torch_module import ArmorLinear

__all__ = ["ArmorLinear"]
