"""Fold an ARMOR checkpoint into its dense twin (W = A·core·B): the reference for parity tests and benchmarks.

    python -m tools.fold ARMOR_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import torch

from vllm_armor import checkpoint_format as fmt

log = logging.getLogger("tools.fold")


def fold_checkpoint(armor_dir: Path, out: Path) -> Path:
    """The dense twin of any ARMOR checkpoint: each pruned linear's weight = A·core·B (fp32, then the dtype
    of its core values); every other tensor, the tokenizer and the config (minus quantization_config)
    copied. An existing ``out`` is reused."""
    if (out / fmt.CONFIG_FILE).exists():
        return out
    config, tensors = fmt.read_folder(armor_dir)
    for module in config.pop("quantization_config")["pruned_modules"]:
        parts = fmt.linear_tensors(tensors, module)
        for suffix in parts:
            del tensors[fmt.tensor_name(module, suffix)]
        tensors[f"{module}.weight"] = fmt.reconstruct_weight(parts, torch.float32).to(parts[fmt.CORE_VALUES].dtype)
    out.mkdir(parents=True, exist_ok=True)
    for f in armor_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (fmt.INDEX_FILE, fmt.CONFIG_FILE):
            shutil.copy(f, out / f.name)
    fmt.write_folder(out, dict(sorted(tensors.items())), config)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("armor_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("wrote %s", fold_checkpoint(args.armor_dir, args.out_dir))


if __name__ == "__main__":
    main()
