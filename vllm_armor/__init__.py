"""vllm-armor: serve ARMOR 2:4-sparse checkpoints with vLLM, and load them with transformers.

Importing this package is cheap: vLLM is imported only when `register()` runs (vLLM calls it through the
`vllm.general_plugins` entry point in every process it starts), and transformers' quantizer ``armor``
(`vllm_armor.hf_quantizer`) is registered only when transformers loads its quantizers, before or after this import.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys

__version__ = "0.1.0"

log = logging.getLogger(__name__)
_HF_QUANTIZERS = "transformers.quantizers"


def register() -> None:
    """Register the `armor` quantization method with vLLM (idempotent)."""
    from vllm_armor.plugin import register_armor

    register_armor()


def register_transformers() -> None:
    """Register the `armor` quantizer with transformers (idempotent): importing `vllm_armor.hf_quantizer` does it. A
    transformers without third-party quantizers is logged, and loaders then refuse ARMOR checkpoints
    (`torch_module.require_armor_layers`)."""
    if "vllm_armor.hf_quantizer" in sys.modules:
        return  # imported already, or being imported right now: it registers itself at its end
    try:
        import vllm_armor.hf_quantizer  # noqa: F401 - registers on import
    except ImportError as err:
        log.warning("vllm_armor: transformers cannot register the 'armor' quantizer (%s)", err)


class _RegisterWithTransformers(importlib.abc.MetaPathFinder):
    """Runs `register_transformers` right after the module ``transformers.quantizers`` has executed."""

    def find_spec(self, name, path, target=None):
        if name != _HF_QUANTIZERS:
            return None
        sys.meta_path.remove(self)
        finders = (f for f in sys.meta_path if hasattr(f, "find_spec"))
        spec = next((s for f in finders if (s := f.find_spec(name, path, target)) is not None), None)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module) -> None:
            exec_module(module)
            register_transformers()

        spec.loader.exec_module = exec_and_register  # type: ignore[method-assign]
        return spec


if _HF_QUANTIZERS in sys.modules:
    register_transformers()
elif not any(isinstance(f, _RegisterWithTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTransformers())
