"""Running decoder layers one at a time over the calibration windows: the inputs of decoder layer 0 (a pre-hook that
stops the model's forward there), a layer over every window, and a layer's input statistics with its outputs.

The walk (offline_prune.walk) and block tuning (offline_prune.tuning) go through the depth with these;
`layer_statistics` is the same capture for a few chosen layers (W and h, e.g. for a benchmark of one matrix).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import torch
from torch import nn

from offline_prune.architectures import Architecture, DecoderLayer, architecture_of, decoder_layers
from offline_prune.errors import UserError
from offline_prune.statistics import InputStats, collect_stats


class _StopForward(Exception):
    pass


@torch.no_grad()
def layer0_inputs(model: nn.Module, layer0: nn.Module, windows: torch.Tensor,
                  device: str) -> tuple[list[torch.Tensor], dict]:
    """Hidden states entering decoder layer 0 for every window, and the layer's keyword arguments."""
    captured: list[torch.Tensor] = []
    kwargs: dict = {}

    def stop(_module, args, kw):
        captured.append(args[0] if args else kw["hidden_states"])
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _StopForward

    handle = layer0.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for window in windows:
            try:
                model(window[None].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured, kwargs


def run_layer(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    """The layer's outputs for every window of ``inputs`` (one tensor per window)."""
    outputs = []
    for hidden in inputs:
        out = layer(hidden, **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


def calibrate(layer: DecoderLayer, hidden: list[torch.Tensor], layer_kwargs: dict, want_gram: bool,
              arch: Architecture) -> tuple[dict[str, InputStats], list[torch.Tensor]]:
    """The input statistics of the layer's linears (full names) and the layer's outputs for every window."""
    local = {layer.local_names[name]: lin for name, lin in layer.linears.items()}
    with collect_stats(local, want_gram, arch.shared_inputs) as local_stats:
        outputs = run_layer(layer.module, hidden, layer_kwargs)
    return {name: local_stats[layer.local_names[name]] for name in layer.linears}, outputs


@torch.no_grad()
def layer_statistics(model: nn.Module, layers: Iterable[int], windows: torch.Tensor,
                     linears: Collection[str] | None = None,
                     device: str = "cpu") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """W and h of the chosen linears of the chosen decoder layers, h = diag(X^T X) from ``windows`` (token ids,
    (n, seqlen)) through the dense model, as the walk of ARMOR and NoWag-P computes them.

    ``layers``: decoder layer indices; ``linears``: names inside a layer (e.g. "self_attn.q_proj"; None: all the
    architecture's). Returns {full module name: (W float32 CPU, h float32 CPU)} in model order. Only the layers up to
    the last chosen one run."""
    arch = architecture_of(model)
    all_layers = decoder_layers(model, arch)
    chosen = sorted(set(layers))
    if not chosen or chosen[0] < 0 or chosen[-1] >= len(all_layers):
        raise UserError(f"layers {chosen}: the model has decoder layers 0..{len(all_layers) - 1}")
    unknown = set(linears or ()) - set(arch.linears)
    if unknown:
        raise UserError(f"linears {sorted(unknown)}: not among the architecture's {list(arch.linears)}")
    hidden, kwargs = layer0_inputs(model, all_layers[0].module, windows, device)
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, layer in enumerate(all_layers[:chosen[-1] + 1]):
        if i not in chosen:
            hidden = run_layer(layer.module, hidden, kwargs)
            continue
        stats, hidden = calibrate(layer, hidden, kwargs, False, arch)
        for name, lin in layer.linears.items():
            if linears is None or layer.local_names[name] in linears:
                found[name] = (lin.weight.detach().float().cpu().clone(), stats[name].h.detach().cpu().clone())
    return found
