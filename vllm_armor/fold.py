"""Fold an ARMOR checkpoint into its dense twin (W = A·core·B): the reference for parity tests and benchmarks.

    python -m vllm_armor.fold ARMOR_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vllm_armor import checkpoint_format as cf

log = logging.getLogger("vllm_armor.fold")
WEIGHTS_FILE = "model.safetensors"


def fold_checkpoint(armor_dir: Path, out: Path) -> Path:
    """The dense twin of any ARMOR checkpoint: each pruned linear's weight = A·core·B (fp32, then the dtype
    of its core values); every other tensor, the tokenizer and the config (minus quantization_config)
    copied."""
    if (out / WEIGHTS_FILE).exists():
        return out
    cfg = json.loads((armor_dir / "config.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(armor_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    dense = dict(tensors)
    for module in cfg["quantization_config"]["pruned_modules"]:
        names = {s: cf.tensor_name(module, s) for s in cf.TENSOR_SUFFIXES}
        parts = {s: dense.pop(n) for s, n in names.items() if n in dense}
        dense[f"{module}.weight"] = cf.reconstruct_weight(parts, torch.float32).to(parts[cf.CORE_VALUES].dtype)
    out.mkdir(parents=True, exist_ok=True)
    for f in armor_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    cfg.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in dense.items()}, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
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
