"""`armor-check DIR`: validate an ARMOR checkpoint folder without loading a model (docs/FORMAT.md).

Checks every weight file against its header, config.json's quantization_config, that every ARMOR tensor belongs
to a listed module and no listed module also keeps a dense weight (`checkpoint_format.CheckpointIndex.read`, the
readers' index), and every pruned module's tensors (`CheckpointIndex.validate`, numerics in the model dtype). Prints
one line: ``OK DIR: ...`` and exit code 0, or ``FAIL DIR: <what, naming the file or tensor>`` and exit code 2.
Imports torch and safetensors only (not vLLM, not transformers); reads one module's tensors at a time.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path

from safetensors import safe_open

from vllm_armor import checkpoint_format as fmt

GB = 1e9


def _open_all(stack: ExitStack, folder: Path) -> dict[str, tuple[Path, object]]:
    """Tensor name -> (file, open safetensors handle) for every weight file (each checked by its header first)."""
    where: dict[str, tuple[Path, object]] = {}
    for path in fmt.weight_files(folder):
        fmt.read_header(path)  # empty, truncated, unreadable: named by the format module
        try:
            handle = stack.enter_context(safe_open(path, framework="pt"))
            names = list(handle.keys())
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise fmt.ArmorFormatError(f"{path.name} is not a readable safetensors file: {err}") from None
        where.update(dict.fromkeys(names, (path, handle)))
    return where


def _get(where: dict[str, tuple[Path, object]], name: str):
    path, handle = where[name]
    try:
        return handle.get_tensor(name)
    except Exception as err:  # noqa: BLE001 - a truncated file fails here
        raise fmt.ArmorFormatError(f"{path.name}: cannot read tensor '{name}': {err}") from None


def check_folder(folder: Path) -> str:
    """Validate ``folder``; return the summary line (raises ArmorFormatError naming the problem).

    The checks are the readers' (`CheckpointIndex.read` on the headers, `CheckpointIndex.validate` on every listed
    module with the model dtype of config.json), without a model: that a listed module is a linear layer of the model
    is left to the readers."""
    config = fmt.read_config(folder)
    if not fmt.is_armor_config(config):
        raise fmt.ArmorFormatError(f"{fmt.CONFIG_FILE} has no ARMOR quantization_config (quant_method 'armor')")
    quant = fmt.validate_quant_config(config["quantization_config"])
    modules: list[str] = quant["pruned_modules"]
    index = fmt.CheckpointIndex.read(folder, modules)
    blocks: set[int] = set()
    with ExitStack() as stack:
        where = _open_all(stack, folder)
        for module in modules:
            tensors = {s: _get(where, fmt.tensor_name(module, s)) for s in fmt.TENSOR_SUFFIXES
                       if fmt.tensor_name(module, s) in where}
            shapes = index.validate(module, tensors, None, serving_dtype=None)
            blocks.update(b for b in (shapes.block_out, shapes.block_in) if b is not None)
    size = fmt.footprint(index.tensors, modules)
    block_text = "/".join(map(str, sorted(blocks))) or "none"
    return (f"{len(modules)} ARMOR linears ({quant.get('method', '?')}, blocks {block_text}), "
            f"{size.checkpoint_bytes / GB:.2f} GB weights ({size.bytes_ratio:.2f}x dense), "
            f"format v{quant['format_version']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="armor-check", description="Validate an ARMOR checkpoint folder.")
    parser.add_argument("folder")
    folder = Path(parser.parse_args(argv).folder)
    try:
        line = check_folder(folder)
    except (fmt.ArmorFormatError, OSError, ValueError) as err:
        sys.stderr.write(f"FAIL {folder}: {err}\n")
        return 2
    sys.stdout.write(f"OK {folder}: {line}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
