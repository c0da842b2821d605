"""The checkpoint's README.md (model card), a pure function of armor_report.json's content."""

from __future__ import annotations

from statistics import mean

CARD_FILE = "README.md"


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _by_kind(linears: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for r in linears:
        kinds.setdefault(_kind(r["name"]), []).append(r)
    return dict(sorted(kinds.items()))


def _blocks(group: list[dict]) -> str:
    sizes = sorted({(r["block_out"], r["block_in"]) for r in group if "block_out" in r})
    return ", ".join(f"{o}x{i}" for o, i in sizes) or "none (A = B = I)"


def _tuning(t: dict | None) -> str:
    if not t:
        return "none"
    if t.get("skipped"):
        return f"skipped: {t['skipped']}"
    return (f"{t['epochs']:g} pass(es), lr {t['lr']:g}: layer output error x{t['mean_error_ratio']} on average, "
            f"{t['layers_kept']} of {t['layers']} layers kept their tuning, "
            f"{t.get('layers_skipped', 0)} skipped for want of time")


def model_card(report: dict) -> str:
    """Markdown model card: base model, method, blocks and overhead, calibration, iterations, losses, command."""
    args, s, linears = report["args"], report["summary"], report["linears"]
    options = report["method_options"]
    calib = report.get("calibration")
    calib_text = (f"{calib['data']}, {calib['samples']} windows of {calib['seqlen']} tokens (seed {args['seed']})"
                  if calib else "none (the method uses no calibration data)")
    iters = [r["iterations"] for r in linears]
    ppl = report.get("perplexity")
    lines = [
        f"# {args['model']} pruned to 2:4 with {args['method']}",
        "",
        "An ARMOR-format checkpoint (vllm-armor, format version "
        f"{report['format_version']}): every pruned linear is stored as a 2:4 sparse core with block-diagonal "
        "A and B (`W = A @ core @ B`), docs/FORMAT.md. Check it with `armor-check DIR`.",
        "",
        "| | |",
        "| --- | --- |",
        f"| base model | `{report['source']}` |",
        f"| method | `{args['method']}` ({', '.join(f'{k}={v}' for k, v in options.items()) or 'no options'}) |",
        f"| pruned linears | {s['linears']}" + (f" (skipped: `{args['skip']}`)" if args.get("skip") else "") + " |",
        f"| A/B overhead | {s['ab_overhead']:.4f} A+B parameters per kept core value |",
        f"| weight bytes | {s['checkpoint_bytes'] / 1e9:.3f} GB, {s['bytes_ratio']:.3f}x the dense model's "
        f"{s['dense_bytes'] / 1e9:.3f} GB |",
        f"| calibration | {calib_text} |",
        f"| iterations per linear | mean {mean(iters):.1f}, max {max(iters)} |",
        f"| proxy loss (relative, mean) | NoWag-P {s['mean_loss_init_relative']:.4f} -> "
        f"{args['method']} {s['mean_loss_final_relative']:.4f} |",
        f"| block tuning | {_tuning(s.get('tuning'))} |",
        f"| perplexity | {ppl if ppl is not None else 'not evaluated'} |",
        "",
        "## Per kind of linear",
        "",
        "| linear | count | blocks (out x in) | NoWag-P loss | final loss |",
        "| --- | --- | --- | --- | --- |",
    ]
    for kind, group in _by_kind(linears).items():
        lines.append(f"| {kind} | {len(group)} | {_blocks(group)} | "
                     f"{mean(r['loss_init_relative'] for r in group):.4f} | "
                     f"{mean(r['loss_final_relative'] for r in group):.4f} |")
    lines += _how_it_was_made(report)
    return "\n".join(lines)


def _how_it_was_made(report: dict) -> list[str]:
    """The card's last sections: the command (or the Python API call), versions, how to serve it."""
    args = report["args"]
    api_args = ", ".join(f"{k}={v!r}" for k, v in args.items() if k != "out")
    command = report.get("command") or f"# Python API\noffline_prune.pipeline.prune(PruneArgs({api_args}, out=...))"
    return [
        "",
        "## How it was made",
        "",
        "```",
        command,
        "```",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
        "Per-linear details are in `armor_report.json`.",
        "",
        "## Serve",
        "",
        "```",
        f"pip install vllm-armor  # registers the quantization method with vLLM\nvllm serve {args['out']} "
        "--quantization armor",
        "```",
        "",
    ]
