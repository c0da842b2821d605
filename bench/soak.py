"""Soak test of a real `vllm serve` of an ARMOR checkpoint under concurrent load.

    .venv/bin/python -m bench.soak ARMOR_DIR [--minutes 10] [--clients 8] [--max-model-len 512]

Starts `vllm serve ARMOR_DIR --quantization armor` on 127.0.0.1 (tools/vllm_server.py), asks a fixed set of greedy
prompts once, alone (the reference), then runs ``--clients`` OpenAI clients for ``--minutes``, each in a bounded loop
with its own role: greedy chat re-asking the reference prompts (answers must be identical), sampled chat, streaming
chat, n>1 completions, streams cancelled after a few chunks, prompts longer than the model length (a 400 is the
expected answer), mixed lengths. At the end the reference prompts are asked alone again. Records every error other
than the expected 400s, the greedy comparisons and the server's RSS (the server process and its children, psutil)
at start, every 30 s and at the end. Writes bench/results/soak/soak-<UTC time>.json and appends the figures to
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psutil

from bench.common import RESULTS, command_line, record
from tools.vllm_server import VllmServer

log = logging.getLogger("bench.soak")
GREEDY_PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three colours.",
    "Explain what a prime number is.",
    "Say hello in Spanish.",
    "What is 12 times 12?",
]
GREEDY_TOKENS = 32
ROLES = ("greedy", "sampled", "stream", "n_best", "cancel", "too_long", "greedy", "mixed")
RSS_EVERY_S = 30.0
TOO_LONG_PAUSE_S = 0.5


def server_rss_mb(pid: int) -> float:
    """Resident memory of the server process and all its children, in MiB."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return float("nan")
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


@dataclass
class Tally:
    """What the clients saw; shared by the client threads (under ``lock``)."""

    reference: dict[str, str]
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: dict[str, int] = field(default_factory=dict)
    expected_400: int = 0
    errors: list[str] = field(default_factory=list)
    greedy_same: int = 0
    greedy_diff: list[dict] = field(default_factory=list)
    cancelled: int = 0

    def count(self, role: str) -> None:
        with self.lock:
            self.requests[role] = self.requests.get(role, 0) + 1

    def error(self, role: str, err: BaseException) -> None:
        with self.lock:
            self.errors.append(f"{role}: {type(err).__name__}: {str(err)[:300]}")

    def greedy(self, prompt: str, answer: str) -> None:
        with self.lock:
            if answer == self.reference[prompt]:
                self.greedy_same += 1
            else:
                self.greedy_diff.append({"prompt": prompt, "reference": self.reference[prompt], "got": answer})


def greedy_answer(client, model: str, prompt: str) -> str:
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                       max_tokens=GREEDY_TOKENS, temperature=0.0)
    return r.choices[0].message.content


def _request(role: str, i: int, client, model: str, tally: Tally, long_prompt: str) -> None:
    chat = [{"role": "user", "content": GREEDY_PROMPTS[i % len(GREEDY_PROMPTS)]}]
    if role == "greedy":
        prompt = GREEDY_PROMPTS[i % len(GREEDY_PROMPTS)]
        tally.greedy(prompt, greedy_answer(client, model, prompt))
    elif role == "sampled":
        client.chat.completions.create(model=model, messages=chat, max_tokens=48, temperature=0.9, seed=i)
    elif role == "stream":
        for _ in client.chat.completions.create(model=model, messages=chat, max_tokens=64, temperature=0.7,
                                                stream=True):
            pass
    elif role == "n_best":
        r = client.completions.create(model=model, prompt=chat[0]["content"], max_tokens=24, temperature=1.0, n=3)
        if len(r.choices) != 3:
            raise RuntimeError(f"n=3 returned {len(r.choices)} choices")
    elif role == "cancel":
        stream = client.chat.completions.create(model=model, messages=chat, max_tokens=200, stream=True)
        for n, _ in enumerate(stream):
            if n >= 3:
                break
        stream.close()  # the server sees the client go away mid-stream
        with tally.lock:
            tally.cancelled += 1
    elif role == "too_long":
        from openai import BadRequestError

        try:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": long_prompt}],
                                           max_tokens=16)
        except BadRequestError:
            with tally.lock:
                tally.expected_400 += 1
            time.sleep(TOO_LONG_PAUSE_S)  # a 400 costs the server nothing: keep this client from flooding the log
            return
        raise RuntimeError("a prompt longer than --max-model-len was accepted")
    elif role == "mixed":
        client.chat.completions.create(model=model, messages=chat, max_tokens=1 + i % 100, temperature=0.5)


def client_loop(role: str, client, model: str, tally: Tally, deadline: float, long_prompt: str) -> None:
    for i in itertools.count():  # bounded by the deadline
        if time.monotonic() >= deadline:
            return
        tally.count(role)
        try:
            _request(role, i, client, model, tally, long_prompt)
        except Exception as err:  # noqa: BLE001 - every unexpected error is recorded, the loop goes on
            tally.error(role, err)
            time.sleep(0.5)


def run(args: argparse.Namespace) -> dict:
    from openai import OpenAI

    from vllm_armor import checkpoint_format as fmt

    armor = fmt.is_armor_config(fmt.read_config(args.armor_dir))  # a dense folder: a control run
    server_args = [*(["--quantization", "armor"] if armor else []), "--max-model-len", str(args.max_model_len),
                   "--max-num-seqs", str(args.clients), "--enforce-eager", "--host", "127.0.0.1", *args.server_arg]
    with VllmServer(args.armor_dir, server_args, timeout_s=900) as srv:
        model = str(args.armor_dir)
        client = OpenAI(base_url=f"{srv.base_url}/v1", api_key="EMPTY", timeout=300, max_retries=0)
        reference = {p: greedy_answer(client, model, p) for p in GREEDY_PROMPTS}  # alone: the reference
        tally = Tally(reference)
        long_prompt = "word " * (args.max_model_len * 2)
        rss = [(0.0, server_rss_mb(srv.proc.pid))]
        started = time.monotonic()
        deadline = started + args.minutes * 60
        threads = [threading.Thread(target=client_loop, name=f"client-{i}-{role}", daemon=True,
                                    args=(role, OpenAI(base_url=f"{srv.base_url}/v1", api_key="EMPTY", timeout=300,
                                                       max_retries=0), model, tally, deadline, long_prompt))
                   for i, role in enumerate(ROLES[i % len(ROLES)] for i in range(args.clients))]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(min(RSS_EVERY_S, max(0.1, deadline - time.monotonic() + 1)))
            rss.append((round(time.monotonic() - started, 1), server_rss_mb(srv.proc.pid)))
        for t in threads:
            t.join(timeout=600)
        final = {p: greedy_answer(client, model, p) for p in GREEDY_PROMPTS}  # alone again, after the load
        alive = srv.proc.poll() is None
    return {
        "requests": tally.requests, "requests_total": sum(tally.requests.values()),
        "expected_400": tally.expected_400, "cancelled_streams": tally.cancelled,
        "errors": len(tally.errors), "error_samples": tally.errors[:20],
        "greedy_compared": tally.greedy_same + len(tally.greedy_diff), "greedy_identical": tally.greedy_same,
        "greedy_differences": tally.greedy_diff[:20],
        "final_greedy_identical": sum(final[p] == reference[p] for p in GREEDY_PROMPTS),
        "greedy_prompts": len(GREEDY_PROMPTS), "reference": reference,
        "rss_mb": [(t, round(m, 1)) for t, m in rss], "rss_start_mb": round(rss[0][1], 1),
        "rss_end_mb": round(rss[-1][1], 1), "server_alive_at_end": alive, "startup_s": round(srv.startup_s, 1),
        "armor": armor, "server_args": server_args,
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("armor_dir", type=Path)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra `vllm serve` argument (repeat), e.g. --server-arg=--dtype=float32")
    parser.add_argument("--no-record", action="store_true", help="print the result only (debug runs)")
    args = parser.parse_args()
    load = Path("/proc/loadavg").read_text().split()[:3]
    result = run(args)
    now = datetime.now(UTC)
    machine = f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, load average {' '.join(load)}"
    payload = {"command": command_line("soak"), "machine": machine, "date": now.isoformat(timespec="seconds"),
               "minutes": args.minutes, "clients": args.clients, "max_model_len": args.max_model_len,
               "roles": list(ROLES[: args.clients]), **result}
    if args.no_record:
        print(json.dumps(payload, indent=1))
        return
    growth = result["rss_end_mb"] - result["rss_start_mb"]
    by_role = ", ".join(f"{k} {v}" for k, v in sorted(result["requests"].items()))
    markdown = (
        f"\n## Soak: vllm serve of {'an ARMOR checkpoint' if result['armor'] else 'a dense model (control)'} under "
        f"load ({now:%Y-%m-%d})\n\n"
        f"- model `{args.armor_dir}`; server arguments `{' '.join(result['server_args'])}`\n"
        f"- {machine} (before the run), `{payload['command']}`, vLLM CPU, eager, "
        f"{' '.join(args.server_arg) or 'model dtype'}, --max-model-len "
        f"{args.max_model_len}, {args.clients} clients ({', '.join(payload['roles'])}) for {args.minutes:g} min\n"
        f"- requests: {result['requests_total']} ({by_role})"
        f"; expected 400s (prompt > model length): {result['expected_400']}; cancelled streams: "
        f"{result['cancelled_streams']}\n"
        f"- errors other than the expected 400s: {result['errors']}\n"
        f"- greedy answers identical to the reference (asked alone at start): {result['greedy_identical']}/"
        f"{result['greedy_compared']} under load, {result['final_greedy_identical']}/{result['greedy_prompts']} "
        f"alone at the end\n"
        f"- server RSS (process + children): {result['rss_start_mb']:.0f} MiB at start, {result['rss_end_mb']:.0f} MiB "
        f"at the end ({growth:+.0f} MiB); server alive at the end: {result['server_alive_at_end']}\n"
    )
    (RESULTS / "soak").mkdir(parents=True, exist_ok=True)
    record(f"soak/soak-{now:%Y%m%dT%H%M%S}", payload, markdown)


if __name__ == "__main__":
    main()
