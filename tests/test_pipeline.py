"""The offline pipeline on tiny random models: statistics, every method, reload, resume, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offline_prune import jobs
from offline_prune.architectures import LLAMA_STYLE
from offline_prune.budget import TUNE_SHARE
from offline_prune.checkpoint import load_model
from offline_prune.errors import UserError
from offline_prune.methods import PruneOutput, all_options, get_method, method_names
from offline_prune.pipeline import prune
from offline_prune.reconstruct import TUNE_LR
from offline_prune.report import LinearReport, Report, Summary, TuningLayer, TuningSummary
from offline_prune.run_args import PruneArgs
from offline_prune.statistics import collect_stats
from offline_prune.walk import depth_rounds
from vllm_armor import checkpoint_format as fmt
from vllm_armor.torch_module import ArmorLinear


def tiny_args(model: Path, out: Path, c4: Path, method: str = "armor", **kw) -> PruneArgs:
    base = dict(calib=f"c4:{c4}", calib_samples=4, calib_seqlen=32, block_size=16, iters=20, optimizer="fast")
    base.update(kw)
    method_options = get_method(method).select(base)  # as the CLI: options of other methods are ignored
    generic = {k: v for k, v in base.items() if k not in {o.name for o in all_options()}}
    return PruneArgs(model=str(model), out=str(out), method=method, options=method_options, **generic)


def test_hooks_h_equals_direct_diag(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    layer = model.model.layers[0]
    linears = {n: layer.get_submodule(n) for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}
    ids = torch.randint(0, 1000, (3, 17))
    with collect_stats(linears, True, LLAMA_STYLE.shared_inputs) as stats, torch.no_grad():
        for row in ids:
            model(row[None], use_cache=False)
    x = layer.input_layernorm(model.model.embed_tokens(ids)).reshape(-1, 64)
    torch.testing.assert_close(stats["self_attn.q_proj"].h, x.square().sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["self_attn.q_proj"].gram, x.T @ x, rtol=1e-4, atol=1e-4)
    assert stats["self_attn.k_proj"] is stats["self_attn.q_proj"] is stats["self_attn.v_proj"]
    assert stats["self_attn.q_proj"].tokens == 3 * 17


def _dense_twin(model_dir: Path, out: Path):
    """The original model with every pruned weight replaced by its dense reconstruction A @ core @ B."""
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    _, state = fmt.read_folder(out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    for module in qc["pruned_modules"]:
        tensors = {s: state[fmt.tensor_name(module, s)] for s in fmt.TENSOR_SUFFIXES
                   if fmt.tensor_name(module, s) in state}
        dense.get_submodule(module).weight.data = fmt.reconstruct_weight(tensors)
    return dense.eval()


# Every method on Llama and Qwen2 (qkv bias); ARMOR on Qwen3 (q/k norm) and Mistral (offline_prune.architectures).
ARCH_METHODS = [(arch, m) for arch in ("llama", "qwen2") for m in method_names()] + [
    ("qwen3", "armor"), ("mistral", "armor"),
]


@pytest.mark.parametrize(("arch", "method"), ARCH_METHODS)
def test_every_method_prunes_and_reloads(arch, method, request, c4_path, tmp_path):
    model_dir = request.getfixturevalue(f"tiny_{arch}")
    out = tmp_path / "out"
    report = prune(tiny_args(model_dir, out, c4_path, method))
    assert report["summary"]["linears"] == 14
    _check_schema(report)
    assert json.loads((out / "armor_report.json").read_text()) == json.loads(json.dumps(report))
    for r in report["linears"]:
        if method in ("armor", "nowag-p"):  # ARMOR never ends above its NoWag-P start
            assert r["loss_final"] <= r["loss_init"] * (1 + 1e-6) + 1e-9, r
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["method"] == method and len(qc["pruned_modules"]) == 14
    loaded = load_model(out)
    pruned = [m for m in loaded.modules() if isinstance(m, ArmorLinear)]
    assert len(pruned) == 14
    assert all((m.blocks is not None) == (method == "armor") for m in pruned)
    # The whole model equals the dense model whose weights are A @ core @ B.
    ids = torch.randint(0, 1000, (2, 24))
    with torch.no_grad():
        got = loaded(ids, use_cache=False).logits
        want = _dense_twin(model_dir, out)(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(got).all()
    if arch == "qwen2":
        assert loaded.model.layers[0].self_attn.q_proj.bias is not None
    if arch == "qwen3":
        assert loaded.model.layers[0].self_attn.q_norm is not None


def _check_schema(report: dict) -> None:
    """The report has the keys of its typed schema (offline_prune.report), every optional one where it applies."""
    assert set(report) == Report.__required_keys__
    assert set(report["summary"]) == Summary.__required_keys__ | Summary.__optional_keys__
    for r in report["linears"]:
        assert LinearReport.__required_keys__ <= set(r), r
    tuning = report["summary"]["tuning"]
    if tuning is not None:
        assert set(tuning) == TuningSummary.__required_keys__ | TuningSummary.__optional_keys__ - {"skipped"}
        assert all(set(r) == TuningLayer.__required_keys__ for r in report["tuning_layers"])


def test_layer_statistics_are_the_dense_models(tiny_llama, c4_path):
    """W and h of chosen layers (offline_prune.capture.layer_statistics) equal hooks on a whole-model forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offline_prune.calibration import c4_windows
    from offline_prune.capture import layer_statistics

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    windows = c4_windows(c4_path, AutoTokenizer.from_pretrained(tiny_llama), 3, 32, seed=0)
    found = layer_statistics(model, [1], windows, ["self_attn.o_proj", "mlp.up_proj"])
    assert list(found) == ["model.layers.1.self_attn.o_proj", "model.layers.1.mlp.up_proj"]
    layer = model.model.layers[1]
    linears = {n: layer.get_submodule(n) for n in ("self_attn.o_proj", "mlp.up_proj")}
    with collect_stats(linears, False, LLAMA_STYLE.shared_inputs) as stats, torch.no_grad():
        model(windows, use_cache=False)
    for local, lin in linears.items():
        w, h = found[f"model.layers.1.{local}"]
        assert torch.equal(w, lin.weight.float())
        torch.testing.assert_close(h, stats[local].h, rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="decoder layers 0..1"):
        layer_statistics(model, [2], windows)
    with pytest.raises(UserError, match="lm_head"):
        layer_statistics(model, [0], windows, ["lm_head"])


def test_job_scores_the_output_it_saves():
    """The dense matrix a job scores (straight from the method's output) is the one its format tensors decode to."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=gen)
    mask = torch.zeros(16, 8, 4, dtype=torch.bool)
    mask[..., 1:3] = True
    mask = mask.reshape(16, 32)
    out = PruneOutput(torch.randn(16, 32, generator=gen) * mask, mask, torch.randn(2, 8, 8, generator=gen),
                      torch.randn(4, 8, 8, generator=gen))
    done = jobs.job_result("m.q_proj", w, torch.rand(32, generator=gen) + 0.5, "armor", out, 0.0)
    assert done.name == "m.q_proj"
    assert torch.equal(jobs.approximation(out), fmt.reconstruct_weight(done.tensors))
    plain = PruneOutput(out.core, mask)
    assert torch.equal(jobs.approximation(plain), fmt.reconstruct_weight(fmt.encode_linear(out.core, mask)))


def test_armor_fast_gram_prunes_sequentially_and_reloads(tiny_llama, c4_path, tmp_path, monkeypatch):
    """fast-gram: the walk hands it X^T X, waits for each layer (sequential) and the checkpoint is A @ core @ B."""
    from offline_prune.methods.armor import entry as armor  # the registry entry's armor_prune

    original = armor.armor_prune
    seen, energies = [], {"fast": set(), "fast-gram": set()}

    def spy(weight, h, *a, **kw):
        seen.append(kw.get("gram") is not None and tuple(kw["gram"].shape) == (weight.shape[1],) * 2)
        energies[kw["optimizer"]].add(round(float(h.sum()), 3))
        return original(weight, h, *a, **kw)

    monkeypatch.setattr(armor, "armor_prune", spy)
    prune(tiny_args(tiny_llama, tmp_path / "fast", c4_path, "armor", iters=1))
    assert not any(seen)
    seen.clear()
    out = tmp_path / "out"
    report = prune(tiny_args(tiny_llama, out, c4_path, "armor", optimizer="fast-gram", iters=5))
    assert seen and all(seen) and len(seen) == 14
    # layer 0 sees the same inputs in both runs; layer 1 sees the pruned layer 0 only with fast-gram
    assert energies["fast"] & energies["fast-gram"] and energies["fast"] != energies["fast-gram"]
    assert {r["optimizer"] for r in report["linears"]} == {"fast-gram"}
    assert report["summary"]["optimizers"] == {"fast-gram": 14}
    assert all(r["layer_loss_final_relative"] <= r["layer_loss_sparsegpt_relative"] for r in report["linears"])
    ids = torch.randint(0, 1000, (2, 24))
    with torch.no_grad():
        got = load_model(out)(ids, use_cache=False).logits
        want = _dense_twin(tiny_llama, out)(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_method_options_defaults_and_unknown(tmp_path):
    args = PruneArgs(model="m", out=str(tmp_path), method="armor", options={"iters": 5})
    assert args.options == {"block_size": "auto", "max_overhead": 0.125, "ab_dtype": "model", "optimizer": "auto",
                            "plateau_tol": 0.002, "plateau_window": 10, "iters": 5}
    assert PruneArgs(model="m", out=str(tmp_path), method="magnitude").run_key()["method"] == "magnitude"
    with pytest.raises(UserError, match="'magnitude' has no option 'iters'"):
        PruneArgs(model="m", out=str(tmp_path), method="magnitude", options={"iters": 5})
    with pytest.raises(UserError, match="choose one of armor, nowag-p, wanda, sparsegpt, magnitude"):
        PruneArgs(model="m", out=str(tmp_path), method="obs")


def test_nowag_p_report_equals_its_init(tiny_llama, c4_path, tmp_path):
    report = prune(tiny_args(tiny_llama, tmp_path / "o", c4_path, "nowag-p"))
    for r in report["linears"]:
        assert r["loss_final"] == pytest.approx(r["loss_init"], rel=1e-5)


def test_armor_beats_nowag_p_on_tiny_model(tiny_llama, c4_path, tmp_path):
    report = prune(tiny_args(tiny_llama, tmp_path / "o", c4_path, "armor", iters=100))
    s = report["summary"]
    assert s["mean_loss_final_relative"] < 0.97 * s["mean_loss_init_relative"]
    assert {r["block_out"] for r in report["linears"]} <= {16}
    # the model card (README.md) and the summary's sizes
    card = (tmp_path / "o" / "README.md").read_text()
    assert s["ab_overhead"] > 0 and s["bytes_ratio"] == pytest.approx(s["checkpoint_bytes"] / s["dense_bytes"])
    for needle in ("pruned to 2:4 with armor", "block_size=16", "| q_proj | 2 | 16x16 |", "A/B overhead",
                   f"{s['ab_overhead']:.4f}", f"{s['bytes_ratio']:.3f}x", "perplexity | not evaluated",
                   "4 windows of 32 tokens", "mean 100.0", "Python API",
                   f"vllm serve {tmp_path / 'o'} --quantization armor"):
        assert needle in card, (needle, card)


@pytest.mark.parametrize("ab_dtype", ["model", "float32"])
def test_auto_blocks_cost_and_ab_dtype_round_trip(tiny_llama, c4_path, tmp_path, ab_dtype):
    """--block-size auto keeps A+B within --max-overhead; A and B are stored in the chosen dtype, the report and
    config.json record the cost, and the model loads back computing what the progress tensors say."""
    out = tmp_path / "o"
    report = prune(tiny_args(tiny_llama, out, c4_path, "armor", iters=3, block_size="auto", max_overhead=0.1,
                             ab_dtype=ab_dtype))
    for r in report["linears"]:
        d_out, d_in = r["shape"]
        assert r["ab_overhead"] <= 0.1 and r["ab_overhead"] == pytest.approx(
            (d_out * r["block_out"] + d_in * r["block_in"]) / (d_out * d_in / 2), abs=1e-6)
    s = report["summary"]
    assert 0 < s["ab_overhead"] <= 0.1
    cfg = json.loads((out / "config.json").read_text())
    quant = cfg["quantization_config"]
    assert quant["block_size"] == "auto" and quant["max_overhead"] == 0.1
    assert quant["cost"]["bytes_ratio"] == pytest.approx(s["bytes_ratio"], abs=1e-6)
    assert quant["cost"]["weight_bytes"] == s["checkpoint_bytes"]
    headers = fmt.read_headers(out)
    want = torch.float32 if ab_dtype == "float32" else getattr(torch, cfg["dtype"])
    ab = {info.dtype for name, info in headers.items() if name.endswith((".armor_a", ".armor_b"))}
    assert ab == {want}
    model = load_model(out)
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(model(ids, use_cache=False).logits).all()


def test_time_budget_is_shared_and_respected(tiny_llama, c4_path, tmp_path):
    """With no plateau and no cap in reach, --time-budget alone ends the run: within the budget, every matrix
    got iterations (the time is shared, not spent on the first ones) and the report says the budget cut them."""
    budget = 12.0
    args = tiny_args(tiny_llama, tmp_path / "o", c4_path, "armor", iters=10**6, block_size="auto", plateau_tol=0.0)
    report = prune(PruneArgs(**{**args.__dict__, "time_budget": budget}))
    s = report["summary"]
    assert s["wall_seconds"] <= budget, s
    assert s["time_budget_s"] == budget and s["stopped"] == {"time_limit": s["linears"]}
    assert all(r["iterations"] >= 1 for r in report["linears"])
    assert set(s["phase_seconds"]) == {"load", "calibration", "optimisation", "tuning", "write"}
    # most of the budget went to the optimiser: block tuning (ARMOR's default) costs the tiny model little
    assert s["phase_seconds"]["optimisation"] > 0.5 * budget
    assert s["phase_seconds"]["tuning"] < TUNE_SHARE * budget
    assert s["tuning"]["layers"] == 2 and s["phase_seconds"]["tuning"] > 0
    assert s["phase_seconds"]["write"] > 0 and json.loads((tmp_path / "o" / "armor_report.json").read_text()) == report
    assert sum(s["phase_seconds"].values()) <= s["wall_seconds"] + 0.01


@pytest.mark.parametrize("method", ["armor", "sparsegpt"])
def test_block_tuning_lowers_every_layer_error_and_keeps_the_mask(tiny_llama, c4_path, tmp_path, method):
    """Block tuning (offline_prune.reconstruct) changes the kept values (and A, B) but never the 2:4 masks, and
    no layer ends with a larger output error than its jobs gave it; a baseline tunes only when asked."""
    common = dict(calib_samples=8, calib_seqlen=32, iters=3)
    untuned = prune(tiny_args(tiny_llama, tmp_path / "a", c4_path, method, tune_epochs=0, **common))
    tuned = prune(tiny_args(tiny_llama, tmp_path / "b", c4_path, method, tune_epochs=4, tune_lr=1e-3, **common))
    assert untuned["summary"]["tuning"] is None and untuned["tuning_layers"] == []
    t = tuned["summary"]["tuning"]
    assert t["layers"] == 2 and t["epochs"] == 4 and t["layers_time_limited"] == 0
    for layer in tuned["tuning_layers"]:
        assert layer["steps"] == 4 and layer["stopped"] == "steps"  # 8 windows of 32 tokens: one step per pass
        assert layer["loss_after"] <= layer["loss_before"]
    assert any(layer["loss_after"] < 0.99 * layer["loss_before"] for layer in tuned["tuning_layers"])
    assert t["mean_error_ratio"] < 1
    _, a = fmt.read_folder(tmp_path / "a")
    _, b = fmt.read_folder(tmp_path / "b")
    assert a.keys() == b.keys()
    metas = [k for k in a if k.endswith(fmt.CORE_META)]
    assert metas and all(torch.equal(a[k], b[k]) for k in metas)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith(fmt.CORE_VALUES))
    assert (method == "armor") == any(k.endswith(fmt.ARMOR_A) for k in b)
    model = load_model(tmp_path / "b")
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 1000, (1, 16)), use_cache=False).logits).all()
    assert PruneArgs(model="m", out="o", method=method).tune_epochs == (1.0 if method == "armor" else 0.0)
    assert PruneArgs(model="m", out="o", method=method).tune_lr == TUNE_LR


def test_a_rerun_with_other_tuning_settings_keeps_the_jobs_and_tunes_again(tiny_llama, c4_path, tmp_path,
                                                                          monkeypatch):
    """A run stopped during block tuning, rerun with other --tune-epochs / --tune-lr: no job runs again, the tuned
    layers of the old settings are dropped, and the checkpoint equals a fresh run of the new settings."""
    from offline_prune import tuning

    common = dict(calib_samples=8, calib_seqlen=32, iters=3)
    full = prune(tiny_args(tiny_llama, tmp_path / "full", c4_path, tune_epochs=2, tune_lr=1e-3, **common))
    out = tmp_path / "rerun"
    real_tune_layer = tuning.tune_layer
    calls = {"n": 0}

    def stop_on_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_tune_layer(*a, **k)

    monkeypatch.setattr(tuning, "tune_layer", stop_on_second)
    with pytest.raises(KeyboardInterrupt):
        prune(tiny_args(tiny_llama, out, c4_path, **common))  # ARMOR's default tuning: 1 epoch, reconstruct.TUNE_LR
    assert len(list((out / ".progress").glob("*.safetensors"))) == 14
    assert len(list((out / ".progress" / "tuned").glob("*.safetensors"))) == 1
    monkeypatch.setattr(tuning, "tune_layer", real_tune_layer)

    def no_job(*a, **k):
        raise AssertionError("a finished job ran again")

    monkeypatch.setattr(jobs, "run_job", no_job)
    report = prune(tiny_args(tiny_llama, out, c4_path, tune_epochs=2, tune_lr=1e-3, **common))
    assert report["summary"]["tuning"]["epochs"] == 2 and report["summary"]["tuning"]["lr"] == 1e-3
    assert report["tuning_layers"] == [{**r, "seconds": s["seconds"]} for r, s in
                                       zip(full["tuning_layers"], report["tuning_layers"], strict=True)]
    assert _files(out) == _files(tmp_path / "full")
    with pytest.raises(UserError, match="--overwrite"):  # a finished run is never changed in place
        prune(tiny_args(tiny_llama, out, c4_path, tune_epochs=1, **common))


def test_only_tuning_settings_may_change_on_a_rerun(tmp_path):
    from offline_prune.progress import PROGRESS_DIR, TUNED_DIR, Progress

    out = tmp_path / "o"
    Progress(out, {"iters": 3, "tune_lr": 1e-4}, False)
    (out / PROGRESS_DIR / TUNED_DIR).mkdir()
    (out / PROGRESS_DIR / TUNED_DIR / "layer-00000.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"other arguments \(differ: tune_lr\)"):
        Progress(out, {"iters": 3, "tune_lr": 1e-3}, False)  # not a tuning key here: refused, nothing lost
    assert (out / PROGRESS_DIR / TUNED_DIR).is_dir()
    with pytest.raises(UserError, match=r"differ: iters, tune_lr"):
        Progress(out, {"iters": 4, "tune_lr": 1e-3}, False, ("tune_lr",))
    Progress(out, {"iters": 3, "tune_lr": 1e-3}, False, ("tune_lr",))
    assert not (out / PROGRESS_DIR / TUNED_DIR).exists()
    assert json.loads((out / PROGRESS_DIR / "run.json").read_text())["tune_lr"] == 1e-3
    assert PruneArgs(model="m", out="o").retune_keys() == ("tune_epochs", "tune_lr")
    assert PruneArgs(model="m", out="o", time_budget=60).retune_keys() == ()  # the plan sets the jobs' limits


def test_time_budget_plans_block_tuning_only_when_it_fits():
    """Block tuning's reserve is decided once the first layer is calibrated: (3 + 3 x epochs) calibration passes of
    every layer, kept when at most half the budget, else 0 (tuning skipped, the jobs keep the whole budget)."""
    from offline_prune.budget import PhaseClock, TimeBudget

    def planned(seconds: float, epochs: float) -> float:
        clock = PhaseClock()
        clock.seconds["calibration"] = 2.0
        budget = TimeBudget(seconds, clock, 0, epochs, layers=30)
        assert budget.tune_reserve() == 0.0 and (budget.tune_planned is None) == (epochs > 0)  # undecided yet
        budget.calibrated_layers = 2  # 1 s per layer
        return budget.tune_reserve()

    assert planned(1000, 1) == pytest.approx(6 * 30)  # fits in half of 1000 s
    assert planned(300, 1) == 0.0  # 180 s > 150 s: skipped
    assert planned(10_000, 0) == 0.0
    assert planned(1000, 2) == pytest.approx(9 * 30)


def test_block_tuning_flag_errors():
    with pytest.raises(UserError, match="--tune-epochs needs calibration"):
        PruneArgs(model="m", out="o", method="magnitude", tune_epochs=1)
    with pytest.raises(UserError, match="--tune-epochs"):
        PruneArgs(model="m", out="o", tune_epochs=-1)


def test_plateau_rule_stops_every_matrix_of_a_tiny_model(tiny_llama, c4_path, tmp_path):
    """With a cap out of reach, the plateau rule (--plateau-tol/--plateau-window) ends every matrix's run, and the
    report says so per matrix and in the summary."""
    args = tiny_args(tiny_llama, tmp_path / "o", c4_path, "armor", iters=10**4, block_size="auto",
                     plateau_tol=0.01, plateau_window=3)
    report = prune(args)
    s = report["summary"]
    assert s["stopped"] == {"plateau": s["linears"]}
    assert all(3 <= r["iterations"] < 10**4 for r in report["linears"]), [r["iterations"] for r in report["linears"]]
    assert report["args"]["plateau_window"] == 3 and report["args"]["plateau_tol"] == 0.01


def test_time_budget_flag_errors(caplog):
    from offline_prune.cli import prune_main

    assert prune_main(["m", "o", "--time-budget", "soon"]) == 2
    assert prune_main(["m", "o", "--time-budget", "5m", "--ray"]) == 2
    err = caplog.text
    assert "--time-budget 'soon': expected a positive duration" in err
    assert "--time-budget is not supported with --ray" in err


def _files(folder: Path) -> dict[str, bytes]:
    # armor_report.json holds timings and README.md names the output folder: all other files must be identical
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_file() and p.name not in ("armor_report.json", "README.md")}


def test_kill_and_resume_gives_identical_checkpoint(tiny_llama, c4_path, tmp_path, monkeypatch):
    full = tmp_path / "full"
    prune(tiny_args(tiny_llama, full, c4_path))
    resumed = tmp_path / "resumed"
    real_run_job = jobs.run_job
    calls = {"n": 0}

    def crash_on_sixth(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_run_job(*a, **k)

    monkeypatch.setattr(jobs, "run_job", crash_on_sixth)
    with pytest.raises(KeyboardInterrupt):
        prune(tiny_args(tiny_llama, resumed, c4_path))
    assert len(list((resumed / ".progress").glob("*.safetensors"))) == 5
    monkeypatch.setattr(jobs, "run_job", real_run_job)
    with pytest.raises(UserError, match="other arguments.*iters"):
        prune(tiny_args(tiny_llama, resumed, c4_path, iters=21))
    prune(tiny_args(tiny_llama, resumed, c4_path))
    assert not (resumed / ".progress").exists()
    assert _files(resumed) == _files(full)
    prune(tiny_args(tiny_llama, resumed, c4_path))  # the same arguments on a finished run: nothing to do
    assert _files(resumed) == _files(full)
    with pytest.raises(UserError, match="--overwrite"):
        prune(tiny_args(tiny_llama, resumed, c4_path, iters=21))
    prune(tiny_args(tiny_llama, resumed, c4_path, method="magnitude"), overwrite=True)


def test_pool_executor_gives_the_local_checkpoint(tiny_llama, c4_path, tmp_path):
    """Jobs in worker processes (bench/convergence_curve.py --workers; layer order) write the same bytes as jobs
    in-process (calibration first, then depth rounds)."""
    from offline_prune.executor import PoolExecutor

    local = prune(tiny_args(tiny_llama, tmp_path / "local", c4_path, iters=3))
    report = prune(tiny_args(tiny_llama, tmp_path / "pool", c4_path, iters=3), executor=PoolExecutor(2))
    assert report["executor"] == {"kind": "process-pool", "workers": 2}
    assert local["summary"]["eta_check"]["order"] == "rounds"
    assert _files(tmp_path / "pool") == _files(tmp_path / "local")


def test_depth_rounds_hold_every_job_once_spread_over_the_depth():
    kinds = ["q", "k", "v", "o", "gate", "up", "down"]
    layers = [[f"{i}.{k}" for k in kinds] for i in range(30)]
    rounds = depth_rounds(layers)
    assert sorted(n for r in rounds for n in r) == sorted(n for x in layers for n in x)
    assert rounds[0] == ["2.q", "6.k", "10.v", "14.o", "18.gate", "22.up", "26.down"]
    for names in rounds:  # one of every kind, each from another layer
        assert [n.split(".")[1] for n in names] == kinds and len({n.split(".")[0] for n in names}) == 7
    few = depth_rounds([["0.q", "0.k", "0.v"], ["1.q", "1.k"]])  # fewer layers than kinds, a layer missing one
    assert sorted(n for r in few for n in r) == ["0.k", "0.q", "0.v", "1.k", "1.q"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from offline_prune.cli import prune_main; sys.exit(prune_main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def _assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and needle in errors[0], proc.stderr


def test_cli_bad_model_path(tmp_path):
    _assert_one_line_error(_cli(str(tmp_path / "nope"), str(tmp_path / "o")), "is neither a local folder")
    (tmp_path / "empty").mkdir()
    _assert_one_line_error(_cli(str(tmp_path / "empty"), str(tmp_path / "o")), "has no config.json")


def test_cli_model_without_supported_linears(tmp_path, smollm2_dir):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=49152)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(folder)
    _assert_one_line_error(_cli(str(folder), str(tmp_path / "o"), "--method", "magnitude"), "no decoder layers")


def test_cli_unreadable_calibration(tmp_path, tiny_llama):
    out = str(tmp_path / "o")
    _assert_one_line_error(_cli(str(tiny_llama), out, "--calib", f"c4:{tmp_path}/missing.jsonl"), "does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    _assert_one_line_error(_cli(str(tiny_llama), out, "--calib", f"c4:{bad}"), "bad.jsonl:2")


def test_pruner_refuses_to_save_a_non_finite_result(tiny_llama, c4_path, tmp_path, monkeypatch):
    import dataclasses

    import offline_prune.jobs

    def nan_core(weight, *args):
        out = get_method("magnitude").prune(weight, *args)
        out.core[0, out.mask[0].nonzero()[0]] = float("nan")
        return out

    broken = dataclasses.replace(get_method("magnitude"), prune=nan_core)
    monkeypatch.setattr(offline_prune.jobs, "get_method", lambda name: broken)
    out = tmp_path / "o"
    with pytest.raises(fmt.ArmorFormatError, match=r"model\.layers\.0\.self_attn\.q_proj\.core_values': contains NaN"):
        prune(tiny_args(tiny_llama, out, c4_path, method="magnitude"))
    assert not list((out / ".progress").glob("*.safetensors"))  # nothing non-finite was saved


def test_eval_refuses_a_non_finite_perplexity(tiny_llama, wikitext_path, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "nan-model"
    shutil.copytree(tiny_llama, folder)
    state = load_file(folder / "model.safetensors")
    state["model.norm.weight"] = torch.full_like(state["model.norm.weight"], float("nan"))
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    code = "import sys; from offline_prune.cli import eval_main; sys.exit(eval_main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "ppl", str(folder), "--data", str(wikitext_path), "--ctx-len",
                           "64", "--max-windows", "2"], capture_output=True, text=True, timeout=300)
    _assert_one_line_error(proc, "is not finite")
    assert proc.stdout == ""


def test_block_tuning_passes_a_layer_left_wholly_dense(tiny_llama, c4_path, tmp_path):
    """--skip leaving every linear of a layer dense: block tuning passes the stream through it (no empty Adam)."""
    out = tmp_path / "out"
    prune(tiny_args(tiny_llama, out, c4_path, iters=2, tune_epochs=1, skip=r"layers\.1\."))
    report = json.loads((out / "armor_report.json").read_text())
    assert [r["layer"] for r in report["tuning_layers"]] == [0, 1]
    assert report["tuning_layers"][1]["steps"] == 0 and report["tuning_layers"][0]["steps"] > 0
    _, tensors = fmt.read_folder(out)
    assert not any(k.startswith("model.layers.1.") and k.endswith(fmt.CORE_VALUES) for k in tensors)
    assert any(k.startswith("model.layers.0.") and k.endswith(fmt.CORE_VALUES) for k in tensors)
