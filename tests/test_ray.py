"""armor-prune --ray on a real local Ray instance (2 CPUs): worker killed mid-run, retries, lost jobs, resume.

Every run here is compared byte for byte with the single-process run of the same arguments.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from offline_prune import jobs
from offline_prune.cli import prune_main
from offline_prune.methods import get_method
from offline_prune.pipeline import PruneArgs, prune

ray = pytest.importorskip("ray", reason="the 'distributed' extra (Ray) is not installed")

from offline_prune.distributed import JobLostError, RayExecutor, RayOptions  # noqa: E402

pytestmark = pytest.mark.slow  # a local Ray instance; `make test-fast` leaves these out

# ARMOR once offline_prune/methods/armor.py exists; until then NoWag-P goes through the same jobs and pipeline.
METHOD = "armor" if importlib.util.find_spec("offline_prune.methods.armor") else "nowag-p"
VICTIM = "model.layers.0.self_attn.o_proj"
LAST = "model.layers.1.mlp.down_proj"


def tiny_args(model: Path, out: Path, c4: Path, method: str = METHOD) -> PruneArgs:
    options = get_method(method).select(dict(block_size=16, iters=20, optimizer="fast"))
    return PruneArgs(model=str(model), out=str(out), method=method, calib=f"c4:{c4}", calib_samples=4,
                     calib_seqlen=32, seed=3, options=options)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance with 2 CPU workers; this module's job wrappers are shipped to them by value."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield ray.cluster_resources()
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        ray.shutdown()


@contextmanager
def one_thread():
    """The single-process run to compare with: one torch thread, as each Ray job with --cpus-per-job 1.

    (SparseGPT's CPU result differs in the last bits between 1 and 2 threads; a run and its Ray twin must
    use the same number of threads per job.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tiny_llama, c4_path, tmp_path_factory) -> bytes:
    """model.safetensors of the single-process run."""
    out = tmp_path_factory.mktemp("local") / "out"
    with one_thread():
        prune(tiny_args(tiny_llama, out, c4_path))
    return (out / "model.safetensors").read_bytes()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def hanging_job(marks: Path, victim: str):
    """run_job, except that the first attempt at ``victim`` writes its worker's pid and hangs (to be killed).

    Every attempt is logged to marks/attempts (one module name a line)."""

    def job(module, weight, stats, options):
        with open(marks / "attempts", "a") as f:
            f.write(module + "\n")
        pid_file = marks / "victim.pid"
        if module == victim and not pid_file.exists():
            _write_atomic(pid_file, str(os.getpid()))
            time.sleep(120)
        return jobs.run_job(module, weight, stats, options)

    return job


def failing_job(victim: str):
    def job(module, weight, stats, options):
        if module == victim:
            raise ValueError(f"genuine failure in {module}")
        return jobs.run_job(module, weight, stats, options)

    return job


def kill_when_started(marks: Path, timeout: float = 60.0) -> threading.Thread:
    """A thread that SIGKILLs the worker process named in marks/victim.pid as soon as it appears."""

    def run() -> None:
        deadline = time.monotonic() + timeout
        pid_file = marks / "victim.pid"
        while not pid_file.exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        pid = int(pid_file.read_text())
        assert pid != os.getpid()
        os.kill(pid, signal.SIGKILL)
        _write_atomic(marks / "killed", str(pid))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def attempts(marks: Path) -> list[str]:
    path = marks / "attempts"
    return path.read_text().split() if path.exists() else []


def test_worker_killed_mid_run_is_retried_and_result_is_identical(cluster, tiny_llama, c4_path, tmp_path,
                                                                     reference):
    assert cluster["CPU"] == 2
    marks = tmp_path / "marks"
    marks.mkdir()
    killer = kill_when_started(marks)
    executor = RayExecutor(RayOptions(max_retries=2), job=hanging_job(marks, VICTIM))
    report = prune(tiny_args(tiny_llama, tmp_path / "out", c4_path), executor=executor)
    killer.join(timeout=5)
    assert (marks / "killed").exists(), "the victim's worker was never killed"
    tried = attempts(marks)
    assert tried.count(VICTIM) == 2  # killed, then retried on a fresh worker
    assert sorted(set(tried)) == sorted(r["name"] for r in report["linears"]) and len(tried) == 15
    assert report["executor"]["kind"] == "ray" and report["executor"]["max_retries"] == 2
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == reference
    assert not (tmp_path / "out" / ".progress").exists()


def test_job_lost_beyond_retries_stops_naming_it_and_rerun_resumes(cluster, tiny_llama, c4_path, tmp_path,
                                                                     reference):
    marks = tmp_path / "marks"
    marks.mkdir()
    out = tmp_path / "out"
    killer = kill_when_started(marks)
    executor = RayExecutor(RayOptions(max_retries=0), job=hanging_job(marks, LAST))
    with pytest.raises(JobLostError, match=f"job {LAST} was lost after 0 retries.*rerun the same command"):
        prune(tiny_args(tiny_llama, out, c4_path), executor=executor)
    killer.join(timeout=5)
    kept = sorted(p.stem for p in (out / ".progress").glob("*.safetensors"))
    assert LAST not in kept and len(kept) >= 1
    assert not list((out / ".progress").glob("*.tmp"))

    rerun_marks = tmp_path / "rerun"
    rerun_marks.mkdir()
    (rerun_marks / "victim.pid").write_text("0")  # nothing hangs this time
    prune(tiny_args(tiny_llama, out, c4_path), executor=RayExecutor(job=hanging_job(rerun_marks, LAST)))
    assert sorted(attempts(rerun_marks)) == sorted(set(_all_names()) - set(kept))  # only the missing jobs ran
    assert (out / "model.safetensors").read_bytes() == reference


def test_job_error_is_not_retried(cluster, tiny_llama, c4_path, tmp_path):
    executor = RayExecutor(RayOptions(max_retries=3), job=failing_job(VICTIM))
    with pytest.raises(ValueError, match=f"genuine failure in {VICTIM}"):
        prune(tiny_args(tiny_llama, tmp_path / "out", c4_path), executor=executor)
    assert (tmp_path / "out" / ".progress").exists()


def _all_names() -> list[str]:
    kinds = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj")
    return [f"model.layers.{i}.{k}" for i in range(2) for k in kinds]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_cli_ray_sequential_method_equals_local_and_puts_once(method, cluster, tiny_llama, c4_path, tmp_path,
                                                               monkeypatch):
    """Wanda/SparseGPT wait for each layer's results; statistics go to the object store once per layer."""
    local = tmp_path / "local"
    with one_thread():
        prune(tiny_args(tiny_llama, local, c4_path, method))
    puts: list[type] = []
    real_put = ray.put

    def counting_put(value, *a, **k):
        puts.append(type(value).__name__)
        return real_put(value, *a, **k)

    monkeypatch.setattr(ray, "put", counting_put)
    out = tmp_path / "ray"
    argv = [str(tiny_llama), str(out), "--method", method, "--calib", f"c4:{c4_path}", "--calib-samples", "4",
            "--calib-seqlen", "32", "--seed", "3", "--device", "cpu", "--ray", "--max-retries", "1"]
    assert prune_main(argv) == 0
    # Per layer: one put per distinct statistic (q/k/v share one, gate/up share one, o, down) and per weight.
    assert sorted(puts) == sorted(["InputStats"] * 4 * 2 + ["Tensor"] * 7 * 2)
    assert (out / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()


def test_without_ray_flag_ray_is_never_imported(tiny_llama, c4_path, tmp_path):
    code = (
        "import sys; from offline_prune.cli import prune_main; rc = prune_main(sys.argv[1:]); "
        "loaded = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')); "
        "print('RAY_MODULES', loaded); sys.exit(rc or (3 if loaded else 0))"
    )
    argv = [str(tiny_llama), str(tmp_path / "o"), "--method", "nowag-p", "--calib", f"c4:{c4_path}",
            "--calib-samples", "2", "--calib-seqlen", "16", "--device", "cpu"]
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RAY_MODULES []" in proc.stdout


def test_ray_flags_without_ray_are_refused(tmp_path):
    assert prune_main(["smollm2-135m", str(tmp_path / "o"), "--gpus-per-job", "0.5"]) == 2
