"""The walk: calibrate the decoder layers, hand the per-matrix jobs to the executor, save every result as it arrives.

Two orders. Sequential methods (SparseGPT, Wanda: they see the pruned earlier layers), methods on X^T X (one
d_in x d_in matrix per input: too big to keep for every layer) and executors that run jobs while the walk
calibrates (Ray, worker processes) go layer by layer (`walk_layers`). Otherwise (ARMOR fast/paper, NoWag-P,
magnitude in this process) the walk calibrates every layer first, then runs the jobs in rounds that sample the depth
(`depth_rounds`), so the rate measured on the first round predicts the rest: layers differ (on SmolLM2 layer 0 needs
1.5x a typical layer's iterations under the plateau rule). What a method needs comes from its registry entry
(offline_prune.methods); the saver and the ETA from offline_prune.saver.
"""

from __future__ import annotations

from tqdm import tqdm

from offline_prune.capture import calibrate, layer0_inputs, run_layer
from offline_prune.executor import LayerJobs
from offline_prune.jobs import JobOptions
from offline_prune.progress import pause_point
from offline_prune.run import Run
from offline_prune.saver import Eta, Saver
from vllm_armor import checkpoint_format as fmt


def walk(run: Run) -> Eta:
    """Run every job not yet in OUT/.progress, in the order the method and the executor call for; returns the ETA
    record (the report's eta_check)."""
    options = run.args.options
    if run.method.is_sequential(options) or run.method.wants_gram(options) or run.executor.runs_beside_walk:
        return walk_layers(run)
    return walk_rounds(run)


def job_options(run: Run) -> JobOptions:
    return JobOptions.create(run.args.method, run.args.options, run.args.seed, run.args.device)


def walk_layers(run: Run) -> Eta:
    """Calibrate one layer, submit its jobs, go on (a sequential method first waits for the layer's jobs and runs
    the pruned layer again for the next layer's inputs). The ETA is taken after the first layer."""
    needs_data = run.windows is not None
    sequential = run.method.is_sequential(run.args.options)
    want_gram = run.method.wants_gram(run.args.options)
    layers, progress, clock = run.layers, run.progress, run.clock
    if needs_data:
        with clock.phase("calibration"):
            hidden, layer_kwargs = layer0_inputs(run.model, layers[0].module, run.windows, run.args.device)
    options = job_options(run)
    saver = Saver(progress, sum(len(layer.linears) for layer in layers), clock, "layers")
    for i, layer in enumerate(layers):
        todo = [name for name in layer.linears if not progress.done(name)]
        stats = {}
        if needs_data and (todo or not sequential):
            with clock.phase("calibration"):
                stats, outputs = calibrate(layer, hidden, layer_kwargs, want_gram, run.arch)
            pause_point("calibration")
        run.executor.submit(LayerJobs(i, {n: layer.linears[n].weight for n in todo}, {n: stats.get(n) for n in todo},
                                      _layer_limits(run, i, todo)), options)
        with clock.phase("optimisation"):
            found = run.executor.wait(todo) if sequential else run.executor.poll()
            saver.save_all(found, f"layer {i + 1}/{len(layers)}")
        if needs_data and sequential:
            with clock.phase("calibration"):
                for name, lin in layer.linears.items():
                    lin.weight.copy_(fmt.reconstruct_weight(progress.load(name)[0]).to(lin.weight))
                outputs = run_layer(layer.module, hidden, layer_kwargs)
        if needs_data:
            hidden = outputs
        saver.round_done()
    with clock.phase("optimisation"):
        saver.save_all(run.executor.wait(), f"layer {len(layers)}/{len(layers)}")
    saver.close()
    return saver.eta


def _layer_limits(run: Run, i: int, todo: list[str]) -> dict[str, float]:
    """The time limits of layer ``i``'s jobs under --time-budget (iterative methods); records the calibration."""
    needs_data = run.windows is not None
    if run.budget is None:
        return {}
    if needs_data:
        run.budget.calibrated_layers = i + 1
    if not todo or not run.method.iterative:
        return {}
    sizes = [{n: lin.weight.numel() for n, lin in layer.linears.items() if not run.progress.done(n)}
             for layer in run.layers[i:]]
    later = sum(sum(s.values()) for s in sizes[1:])
    return run.budget.layer_limits(sizes[0], later, len(run.layers) - i - 1 if needs_data else 0)


def walk_rounds(run: Run) -> Eta:
    """Calibrate every layer on the dense model (keeping only the small per-input statistics), then run the jobs
    in ``depth_rounds``. The ETA is taken after the first round, from the optimisation time alone."""
    stats = _dense_statistics(run)
    weights = {name: lin.weight for layer in run.layers for name, lin in layer.linears.items()}
    rounds = [[n for n in names if not run.progress.done(n)]
              for names in depth_rounds([list(x.linears) for x in run.layers])]
    rounds = [names for names in rounds if names]
    options = job_options(run)
    saver = Saver(run.progress, len(weights), run.clock, "rounds")
    for r, names in enumerate(rounds):
        limits = {}
        if run.budget is not None and run.method.iterative:
            later = sum(weights[n].numel() for later_names in rounds[r + 1:] for n in later_names)
            limits = run.budget.layer_limits({n: weights[n].numel() for n in names}, later, 0)
        run.executor.submit(LayerJobs(r, {n: weights[n] for n in names}, {n: stats.get(n) for n in names}, limits),
                            options)
        with run.clock.phase("optimisation"):
            saver.save_all(run.executor.poll(), f"round {r + 1}/{len(rounds)}")
        saver.round_done()
    with run.clock.phase("optimisation"):
        saver.save_all(run.executor.wait(), f"round {len(rounds)}/{len(rounds)}")
    saver.close()
    return saver.eta


def _dense_statistics(run: Run) -> dict:
    """The input statistics of every linear still to prune (full name -> InputStats), on the dense model."""
    stats: dict = {}
    if run.windows is None:
        return stats
    with run.clock.phase("calibration"):
        hidden, layer_kwargs = layer0_inputs(run.model, run.layers[0].module, run.windows, run.args.device)
        last = max((i for i, layer in enumerate(run.layers) if not all(map(run.progress.done, layer.linears))),
                   default=-1)
        for layer in tqdm(run.layers[:last + 1], desc="calibration", unit="layer"):
            layer_stats, hidden = calibrate(layer, hidden, layer_kwargs, False, run.arch)
            stats.update(layer_stats)
            pause_point("calibration")
    if run.budget is not None:
        run.budget.calibrated_layers = len(run.layers)
    return stats


def depth_rounds(layers: list[list[str]]) -> list[list[str]]:
    """The jobs of ``layers`` (each layer's linears in model order: q, k, v, o, gate, up, down) as rounds that
    each hold one linear of every kind, the kinds taken from layers spread evenly over the depth.

    Kind t of round r comes from layer (r + t*s + s//2) mod L with s = max(1, L // kinds): for a fixed kind
    this visits every layer once, so the rounds hold every job exactly once. SmolLM2 (30 layers, 7 kinds, s 4):
    round 0 = q of layer 2, k of 6, v of 10, o of 14, gate of 18, up of 22, down of 26."""
    n_layers = len(layers)
    kinds = max((len(x) for x in layers), default=0)
    stride = max(1, n_layers // max(kinds, 1))
    rounds = []
    for r in range(n_layers):
        picks = ((r + t * stride + stride // 2) % n_layers for t in range(kinds))
        rounds.append([layers[i][t] for t, i in enumerate(picks) if t < len(layers[i])])
    return rounds

