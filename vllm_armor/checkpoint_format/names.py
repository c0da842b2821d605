"""The format's names: version, tensor suffixes, packing constants, file names, and its one error type."""

from __future__ import annotations

FORMAT_VERSION = 1
QUANT_METHOD = "armor"
SPARSITY = "2:4"

CORE_VALUES = "core_values"
CORE_META = "core_meta"
ARMOR_A = "armor_a"
ARMOR_B = "armor_b"
TENSOR_SUFFIXES = (CORE_VALUES, CORE_META, ARMOR_A, ARMOR_B)

GROUP = 4  # consecutive inputs of a 2:4 group
KEEP = 2  # kept inputs per group
META_INPUTS = 2 * GROUP  # inputs described by one metadata byte

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 4 * 1024**3


class ArmorFormatError(Exception):
    """A checkpoint or tensor does not follow the ARMOR format; the message (one line) names what is wrong.

    Not a ValueError on purpose: vLLM builds its config in a pydantic validator, which would wrap a ValueError
    raised by the plugin's header checks into a multi-line ValidationError; this one passes through unchanged."""


def tensor_name(module: str, suffix: str) -> str:
    return f"{module}.{suffix}"


def tensor_error(module: str, suffix: str, msg: str) -> ArmorFormatError:
    """The error about one tensor of one module: ``ARMOR tensor 'module.suffix': msg``."""
    return ArmorFormatError(f"ARMOR tensor '{tensor_name(module, suffix)}': {msg}")


def module_tensors(module: str, names: object) -> dict[str, str]:
    """suffix -> full tensor name for every format tensor of ``module`` found in ``names`` (a mapping or set)."""
    return {s: tensor_name(module, s) for s in TENSOR_SUFFIXES if tensor_name(module, s) in names}
