"""Shared fixtures: the tiny ARMOR checkpoints are built once per session (or reused from ARMOR_TEST_CACHE)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import armor_fixtures as af  # noqa: E402


@pytest.fixture(scope="session")
def fixture_cache(tmp_path_factory) -> Path:
    env = os.environ.get("ARMOR_TEST_CACHE")
    if env:
        path = Path(env)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("armor-fixtures")


@pytest.fixture(scope="session")
def tiny_llama(fixture_cache) -> tuple[Path, Path]:
    return af.build_tiny(af.TINY_LLAMA, fixture_cache)


@pytest.fixture(scope="session")
def tiny_llama_24(fixture_cache) -> tuple[Path, Path]:
    return af.build_tiny(af.TINY_LLAMA_24, fixture_cache)


@pytest.fixture(scope="session")
def tiny_qwen2(fixture_cache) -> tuple[Path, Path]:
    return af.build_tiny(af.TINY_QWEN2, fixture_cache)
