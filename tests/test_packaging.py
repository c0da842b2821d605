"""The project's wheel builds with no setuptools deprecation warning and carries what `make setup` runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What the wheel is built from (pyproject's packages.find and readme): copied, so the checkout gets no build/.
SOURCES = ("pyproject.toml", "README.md", "offline_prune", "vllm_armor")


@pytest.fixture(scope="module")
def wheel_build(tmp_path_factory) -> tuple[Path, str]:
    """(the built wheel, pip's verbose log, which holds the build backend's warnings)."""
    src = tmp_path_factory.mktemp("wheel-src")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    dist = src / "dist"
    # --no-build-isolation: the environment's setuptools (pyproject's build-system floor applies to it too)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                           "-w", str(dist), str(src)], capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"pip wheel failed ({proc.returncode}):\n{log[-4000:]}"
    wheels = list(dist.glob("vllm_armor-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {dist}, found {wheels}"
    return wheels[0], log


def test_wheel_builds_without_backend_warnings(wheel_build) -> None:
    _, log = wheel_build
    warned = [line.strip() for line in log.splitlines()
              if "BuildBackendWarning" in line or "SetuptoolsDeprecationWarning" in line]
    assert not warned, "the build backend warned:\n" + "\n".join(warned)


def test_wheel_metadata_has_the_spdx_license_and_the_kernel_build_entry(wheel_build) -> None:
    wheel, _ = wheel_build
    with zipfile.ZipFile(wheel) as zf:
        metadata = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        entries = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    # `make setup` builds the CPU kernel with this entry (not `python -m`, which runpy warns about)
    assert "armor-build-kernels = vllm_armor.kernels.cpu_build:main" in entries.splitlines()
