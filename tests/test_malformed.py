"""Malformed ARMOR checkpoints fail at vLLM start-up with one message naming the file, tensor or layer and the
problem (the same message as the offline reader's and armor-check's, tests/test_bad_checkpoints.py): damaged files,
wrong dtypes, config and tensors that disagree, non-finite layers, fused-layer shards that disagree. All of them run
through one subprocess (tests/startup_errors.py), one vLLM start attempt each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import armor_fixtures as af
import pytest

from tools.vllm_server import run_failing

pytestmark = pytest.mark.e2e
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def startup_messages(armor_tiny_llama, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("malformed")
    dirs = {kind: af.make_malformed(armor_tiny_llama[0], root / kind, kind) for kind in af.ALL_MALFORMED}
    dirs["good"] = armor_tiny_llama[0]  # the control: the same checks pass a valid checkpoint
    proc = subprocess.run(
        [sys.executable, str(HERE / "startup_errors.py"), *map(str, dirs.values())],
        capture_output=True, text=True, timeout=600,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("STARTUP_RESULTS ")), None)
    assert line is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    by_dir = json.loads(line.split(" ", 1)[1])
    return {kind: by_dir[str(d)] for kind, d in dirs.items()}


def test_valid_checkpoint_starts(startup_messages):
    assert startup_messages["good"] == "STARTED"


@pytest.mark.parametrize("kind", sorted(af.ALL_MALFORMED))
def test_malformed_checkpoint_fails_at_startup(startup_messages, kind):
    message = startup_messages[kind]
    assert message != "STARTED", f"{kind}: vLLM started on a malformed checkpoint"
    assert message.startswith("ArmorFormatError: "), message  # not wrapped (e.g. in pydantic's ValidationError)
    assert "\n" not in message, message
    assert af.ALL_MALFORMED[kind] in message, message


def test_vllm_serve_reports_missing_tensor(armor_tiny_llama, tmp_path):
    bad = af.make_malformed(armor_tiny_llama[0], tmp_path / "bad", "missing_tensor")
    out = run_failing(bad, ["--enforce-eager", "--max-model-len", "256"])
    assert af.MALFORMED["missing_tensor"] in out, out[-3000:]
