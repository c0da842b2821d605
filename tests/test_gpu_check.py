"""bench/gpu_check.py's parts that run without a GPU: arguments, the refusal without CUDA, the optimiser timing
(the same public API it calls on the GPU, here on a small matrix on CPU) and the tables it writes."""

from __future__ import annotations

import importlib
import json
import logging

import pytest
import torch


@pytest.fixture(scope="module")
def gpu_check():
    return importlib.import_module("bench.gpu_check")


def test_arguments(gpu_check, tmp_path):
    args = gpu_check.parse_args([str(tmp_path), "--parts", "layers, model"])
    assert args.out == tmp_path and args.parts == ["layers", "model"] and args.budget_s == 450
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args([str(tmp_path), "--parts", "layers,speed"])
    assert exc.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda_in_one_line(gpu_check, tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="gpu_check"):
        assert gpu_check.main([str(tmp_path / "out")]) == 2
    assert len(caplog.records) == 1 and "no CUDA device" in caplog.records[0].getMessage()
    assert not (tmp_path / "out").exists()


def test_optimizer_timing_runs_the_registry_api(gpu_check):
    assert gpu_check.seconds_per_iteration((256, 512), "cpu", iters=(1, 6)) > 0


def _layer_row(dense_us: float, speedup: float, err: float) -> dict:
    return {"eager_us": dense_us / speedup * 3, "graph_us": dense_us / speedup, "rel_err": err,
            "graph_replay_equal": True}


def test_tables_and_targets(gpu_check, tmp_path):
    """Table writing from a results dict of the shape part_layers returns (figures made up for the format)."""
    layers = {}
    for d_out, d_in in gpu_check.SHAPES:
        kinds = {kind: {m: _layer_row(100.0, speed, 1e-3) for m in gpu_check.M_VALUES}
                 for kind, speed in (("dense", 1.0), ("cusparselt", 0.5), ("triton24", 1.6), ("armor", 1.4))}
        layers[f"{d_out}x{d_in}"] = kinds
    layers["1024x4096"]["cusparselt"] = {"error": "RuntimeError: no cuSPARSELt"}
    results = {"env": {"device": "NVIDIA H100", "torch": "2.11", "triton": "3.6", "date": "2026-12-05"},
               "parts": {"layers": layers, "model": {"ratio_b1": 1.2}, "tests": {"error": "TimeoutExpired"}},
               "wall_s": 400.0}
    gpu_check.write_outputs(tmp_path, results)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "# GPU check (NVIDIA H100)" in md and "FAILED: TimeoutExpired" in md
    assert "ARMOR at M=1 vs dense on the 7B shapes (target >= 1.3x): 1.40x, 1.40x, 1.40x" in md
    assert "CUDA-graph replay equal to eager everywhere: yes" in md
    assert "| 4096x4096 | 1 | 100.0 | 0.50x | 1.60x | 1.40x | 1.40x | 1.0e-03 | yes |" in md
    assert "| 1024x4096 | 1 | 100.0 | RuntimeError: no cuSPARSELt |" in md
    assert json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["model"] == {"ratio_b1": 1.2}
