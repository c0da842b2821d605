"""Build and load the C++ CPU kernel (`csrc/sparse24_cpu.cpp`, op ``vllm_armor::sparse24_cpu_linear``).

Compiled once per (source, flags, torch version, compiler) into ``$VLLM_ARMOR_CACHE/kernels/<hash>`` (default
``~/.cache/vllm-armor/kernels/<hash>``) under a file lock, so that vLLM's processes (API server, engine
core, tensor-parallel workers) and parallel test sessions never build it twice at once; later processes only
load the cached library. `make setup` and the CPU Docker image build it ahead (``python -m
vllm_armor.kernels.cpu_build``).

`load()` never raises: it returns None with the reason (CPU without AVX-512 BF16, build disabled with
``VLLM_ARMOR_CPU_KERNEL=0``, compiler error), which the kernel selection logs in its one start-up line.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

log = logging.getLogger("vllm.armor")

SOURCE = Path(__file__).parent / "csrc" / "sparse24_cpu.cpp"
CACHE_ENV = "VLLM_ARMOR_CACHE"  # same variable as the bundled model's cache (offline_prune/models.py)
DISABLE_ENV = "VLLM_ARMOR_CPU_KERNEL"  # "0": never build or load the CPU kernel (the fold is used)
# The instructions the kernel uses, as /proc/cpuinfo names them.
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vbmi2")
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vbmi2", "-fopenmp",
          "-std=c++17"]
LDFLAGS = ["-fopenmp"]

_STATE: dict[str, object] = {}


def cpu_missing_flags() -> list[str]:
    """Instructions the kernel needs that this CPU lacks (all of them off x86-64 Linux)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return [f"x86-64 (this is {platform.machine()})"]
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ["/proc/cpuinfo (unreadable)"]
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return [f for f in CPU_FLAGS if f not in flags]


def _compiler_id() -> str:
    try:
        return subprocess.run(["c++", "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    except (OSError, subprocess.SubprocessError):
        return "no c++"


def build_dir() -> Path:
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(CFLAGS + LDFLAGS).encode(), torch.__version__.encode(),
                 _compiler_id().encode(), sys.version.encode()):
        key.update(part)
    base = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vllm-armor")
    return base / "kernels" / key.hexdigest()[:16]


def _build(where: Path) -> None:
    from torch.utils import cpp_extension

    where.mkdir(parents=True, exist_ok=True)
    with open(where / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait, then load the cached library
        cpp_extension.load(name=f"armor_sparse24_cpu_{where.name}", sources=[str(SOURCE)], extra_cflags=CFLAGS,
                           extra_ldflags=LDFLAGS, build_directory=str(where), is_python_module=False,
                           verbose=False)


def load() -> tuple[bool, str]:
    """(available, reason): build or load the kernel once per process."""
    if "ok" not in _STATE:
        _STATE["ok"], _STATE["why"] = _load()
    return bool(_STATE["ok"]), str(_STATE["why"])


def _load() -> tuple[bool, str]:
    if os.environ.get(DISABLE_ENV, "1").strip() == "0":
        return False, f"CPU 2:4 kernel disabled by {DISABLE_ENV}=0"
    missing = cpu_missing_flags()
    if missing:
        return False, f"this CPU lacks {', '.join(missing)} (the CPU 2:4 kernel needs AVX-512 BF16 and VBMI2)"
    where = build_dir()
    try:
        _build(where)
    except Exception as err:  # noqa: BLE001 - any build or load failure means: use the fold
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return False, f"the CPU 2:4 kernel did not build ({first[:200]}; build folder {where})"
    if not hasattr(torch.ops.vllm_armor, "sparse24_cpu_linear"):
        return False, f"the CPU 2:4 kernel library in {where} registered no op"
    return True, f"CPU 2:4 kernel built in {where}"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ok, why = load()
    log.info("%s: %s", "OK" if ok else "UNAVAILABLE", why)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
