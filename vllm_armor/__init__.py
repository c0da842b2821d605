"""vllm-armor: serve ARMOR 2:4-sparse checkpoints with vLLM.

Importing this package is cheap: vLLM is imported only when `register()` runs (vLLM calls it through the
`vllm.general_plugins` entry point in every process it starts).
"""

from __future__ import annotations

__version__ = "0.1.0"


def register() -> None:
    """Register the `armor` quantization method with vLLM (idempotent)."""
    from vllm_armor.plugin import register_armor

    register_armor()
