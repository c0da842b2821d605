"""Interrupted and failing `armor-prune` runs (#16 point 6): a real armor-prune subprocess on a tiny random Llama is
SIGKILLed at several points (during calibration, during a job, while a progress file is being written, during the
final write, and at seeded random moments); a rerun of the same command then gives a checkpoint byte-identical to
an uninterrupted run. A read-only output folder and a full disk give one clear line and lose no finished work.

The points are found with the test hook of `offline_prune.progress.pause_point` (ARMOR_PRUNE_PAUSE_AT=POINT[:N]:
the run announces the point on stderr and sleeps there); the kill itself is a real SIGKILL.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from safetensors import safe_open

from offline_prune.progress import PAUSE_ENV, PAUSE_MARK, PROGRESS_DIR, RETIRED_DIR

pytestmark = pytest.mark.slow  # each test runs (and kills, and reruns) armor-prune subprocesses: minutes in all

REPO = Path(__file__).resolve().parents[1]
OUT = "out"  # relative to each test's working folder: the command line (kept in the report) is the same everywhere
TIMINGS = {"seconds", "job_seconds", "wall_seconds", "phase_seconds", "eta_check"}
MAIN = "import sys; from offline_prune.cli import prune_main; sys.exit(prune_main())"  # = armor-prune


def _command(tiny: Path, c4: Path) -> list[str]:
    return [sys.executable, "-c", MAIN, str(tiny), OUT, "--method", "armor", "--iters", "3", "--block-size", "16",
            "--calib", f"c4:{c4}", "--calib-samples", "4", "--calib-seqlen", "32", "--device", "cpu"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != PAUSE_ENV}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", **extra)
    return env


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k not in TIMINGS}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def _snapshot(folder: Path) -> dict[str, object]:
    """Every file of a finished checkpoint: bytes, except the report's timings (which differ between any two runs)."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            rel = str(path.relative_to(folder))
            files[rel] = _without_timings(json.loads(path.read_text())) if rel == "armor_report.json" else \
                path.read_bytes()
    return files


@pytest.fixture(scope="module")
def reference(tiny_llama, c4_path, tmp_path_factory) -> tuple[dict[str, object], float]:
    """(snapshot of an uninterrupted run, its wall seconds)."""
    cwd = tmp_path_factory.mktemp("reference")
    start = time.monotonic()
    proc = _run(_command(tiny_llama, c4_path), cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _snapshot(cwd / OUT), time.monotonic() - start


def _kill_when(cmd: list[str], cwd: Path, point: str | None = None, after_s: float | None = None,
               must_kill: bool = True) -> bool:
    """Start armor-prune, SIGKILL it at the pause point (or after ``after_s`` seconds), wait for it to die.
    Returns whether the kill hit the running process (``must_kill``: assert that it did)."""
    env = _env(**({PAUSE_ENV: point} if point else {}))
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    paused = threading.Event()
    tail: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            tail.append(line)
            if PAUSE_MARK in line:
                paused.set()

    threading.Thread(target=read, daemon=True).start()
    if point:
        assert paused.wait(300), f"never reached {point}: {''.join(tail)[-3000:]}"
    else:
        time.sleep(after_s)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    killed = proc.wait(60) == -signal.SIGKILL
    assert killed or not must_kill, f"the run ended before the kill: {''.join(tail)[-2000:]}"
    return killed


def _progress_files_whole(out: Path) -> list[str]:
    """The finished linears under .progress/ (each file opens and reads completely)."""
    names = []
    for path in sorted((out / PROGRESS_DIR).glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
        names.append(path.name)
    return names


@pytest.mark.parametrize("point", ["calibration:2", "job:5", "progress_write:3", "tuning:1", "final_write", "retire"])
def test_kill_at_a_point_then_rerun_is_byte_identical(reference, tiny_llama, c4_path, tmp_path, point):
    cmd = _command(tiny_llama, c4_path)
    _kill_when(cmd, tmp_path, point=point)
    out = tmp_path / OUT
    if point == "retire":  # killed after the last write, while removing the retired progress: nothing left to do
        assert (out / "armor_report.json").is_file() and (out / RETIRED_DIR).is_dir()
        assert not (out / PROGRESS_DIR).exists()
        assert _run(cmd, tmp_path).returncode == 0 and _snapshot(out) == reference[0]
        return
    assert (out / PROGRESS_DIR / "run.json").is_file()
    done = _progress_files_whole(out)
    if point == "progress_write:3":  # killed between writing the 3rd file and renaming it: 2 trusted, 1 temporary
        assert len(done) == 2 and len(list((out / PROGRESS_DIR).glob(".*.tmp"))) == 1
    if point == "tuning:1":  # every job done, the first layer block-tuned (ARMOR's default)
        assert len(done) == 14 and len(list((out / PROGRESS_DIR / "tuned").glob("layer-*.safetensors"))) == 1
    if point == "final_write":
        assert len(done) == 14 and (out / "model.safetensors").is_file() and not (out / "armor_report.json").exists()
    proc = _run(cmd, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _snapshot(out) == reference[0]


@pytest.mark.parametrize("seed", [1, 2])
def test_kill_at_a_random_moment_then_rerun_is_byte_identical(reference, tiny_llama, c4_path, tmp_path, seed):
    cmd = _command(tiny_llama, c4_path)
    delay = random.Random(seed).uniform(0.2, 0.9) * reference[1]
    # the reference's wall time varies with the machine's load: a run that ended before the kill is started over
    # (same command, it does nothing then) with a shorter delay, until a kill lands inside a run
    for _ in range(6):
        shutil.rmtree(tmp_path / OUT, ignore_errors=True)
        if _kill_when(cmd, tmp_path, after_s=delay, must_kill=False):
            break
        delay /= 2
    else:
        pytest.fail("no kill landed inside a run")
    proc = _run(cmd, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _snapshot(tmp_path / OUT) == reference[0]


def test_rerun_of_a_finished_run_changes_nothing(reference, tiny_llama, c4_path, tmp_path):
    """A kill that came after the last write: the rerun finds the finished run and leaves it as it is."""
    cmd = _command(tiny_llama, c4_path)
    assert _run(cmd, tmp_path).returncode == 0
    proc = _run(cmd, tmp_path)
    assert proc.returncode == 0 and "already holds the finished run" in proc.stderr, proc.stderr[-2000:]
    assert _snapshot(tmp_path / OUT) == reference[0]


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@contextmanager
def _read_only(folder: Path):
    """``folder`` read-only: a read-only bind mount as root (root ignores permissions), else chmod."""
    if os.geteuid() == 0:
        _mount("--bind", str(folder), str(folder))
        try:
            _mount("-o", "remount,bind,ro", str(folder))
            yield
        finally:
            subprocess.run(["umount", str(folder)], check=True)
    else:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)


def test_read_only_output_is_one_line_and_keeps_finished_work(reference, tiny_llama, c4_path, tmp_path):
    cmd = _command(tiny_llama, c4_path)
    _kill_when(cmd, tmp_path, point="progress_write:4")
    out = tmp_path / OUT
    before = _progress_files_whole(out)
    assert len(before) == 3
    with _read_only(out):
        proc = _run(cmd, tmp_path)
        assert proc.returncode == 2
        line = _one_error_line(proc.stderr)
        assert "I/O error" in line and ("Read-only file system" in line or "Permission denied" in line), line
        assert "rerun the same command" in line
    assert _progress_files_whole(out) == before
    assert _run(cmd, tmp_path).returncode == 0
    assert _snapshot(out) == reference[0]


def _can_mount_tmpfs(folder: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    folder.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
    if ok.returncode == 0:
        subprocess.run(["umount", str(folder)], check=True)
    return ok.returncode == 0


def test_full_disk_is_one_line_and_keeps_finished_work(reference, tiny_llama, c4_path, tmp_path, caplog,
                                                       monkeypatch):
    """A real full disk where a small tmpfs can be mounted (root); else the write raises ENOSPC in-process."""
    mnt = tmp_path / "mnt"
    if _can_mount_tmpfs(mnt):
        _mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt))  # .progress fits, the 6 MB checkpoint does not
        try:
            cmd = _command(tiny_llama, c4_path)
            proc = _run(cmd, mnt)
            assert proc.returncode == 2
            line = _one_error_line(proc.stderr)
            assert "I/O error" in line and "No space left on device" in line, line
            assert len(_progress_files_whole(mnt / OUT)) == 14
            assert not list((mnt / OUT).glob(".*.tmp")), "a failed write left its temporary file"
            _mount("-o", "remount,size=64m", str(mnt))
            assert _run(cmd, mnt).returncode == 0
            assert _snapshot(mnt / OUT) == reference[0]
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        return
    _full_disk_in_process(reference, tiny_llama, c4_path, tmp_path, caplog, monkeypatch)


def _full_disk_in_process(reference, tiny_llama, c4_path, tmp_path, caplog, monkeypatch) -> None:
    import errno
    import logging

    from offline_prune.cli import prune_main
    from vllm_armor import checkpoint_format as fmt

    real, calls = fmt.atomic_save_file, []

    def fill(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(tensors, path, *args, **kwargs)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fmt, "atomic_save_file", fill)
    argv = _command(tiny_llama, c4_path)[3:]
    with caplog.at_level(logging.ERROR):
        assert prune_main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "No space left on device" in errors[0], errors
    assert len(_progress_files_whole(tmp_path / OUT)) == 3
    monkeypatch.setattr(fmt, "atomic_save_file", real)
    assert _run(_command(tiny_llama, c4_path), tmp_path).returncode == 0
    assert _snapshot(tmp_path / OUT) == reference[0]
