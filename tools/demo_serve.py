"""One side of `make demo`'s summary measured through a real `vllm serve`: the greedy chat answers to the demo
questions (`tools.demo_questions`) and the decode speed of one streamed request.

Decode speed: one greedy completion of `DECODE_TOKENS` tokens (``ignore_eos``, so it never stops early), streamed;
tokens per second counted after the first token (``(tokens - 1) / (time of the last - time of the first)``), so
neither start-up nor prefill is in it. It is one request on a shared machine: the load average is kept with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.answers import is_right
from bench.common import loadavg
from tools.demo_questions import ANSWER_TOKENS, chat_text, demo_items
from tools.vllm_server import VllmServer

log = logging.getLogger("tools.demo_serve")
DECODE_TOKENS = 64
DECODE_PROMPT = "The history of the city begins"
SERVE_ARGS = ["--max-model-len", "2048", "--enforce-eager"]


def chat_answers(srv: VllmServer) -> list[dict]:
    """Every demo question's greedy answer: [{"q", "answer", "right"}] in `DEMO_QUESTIONS` order."""
    items = demo_items()
    client = srv.client()

    def ask(text: str) -> str:
        reply = client.chat.completions.create(
            model=str(srv.model), messages=[{"role": "user", "content": text}], max_tokens=ANSWER_TOKENS,
            temperature=0.0,
        )
        return (reply.choices[0].message.content or "").strip()

    with ThreadPoolExecutor(len(items)) as pool:  # one batch for the server
        answers = list(pool.map(ask, [chat_text(it) for it in items]))
    return [{"q": it.question, "answer": a, "right": is_right(a, it.answers)}
            for it, a in zip(items, answers, strict=True)]


def decode_speed(srv: VllmServer, tokens: int = DECODE_TOKENS) -> dict:
    """Tokens per second after the first token of one streamed greedy completion of ``tokens`` tokens."""
    stream = srv.client().completions.create(
        model=str(srv.model), prompt=DECODE_PROMPT, max_tokens=tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    stamps, generated = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            generated = chunk.usage.completion_tokens
    generated = generated or len(stamps)
    if len(stamps) < 2 or generated < 2:
        raise RuntimeError(f"streamed completion gave {generated} tokens in {len(stamps)} chunks")
    if generated != len(stamps):
        log.info("decode: %d tokens came in %d chunks", generated, len(stamps))
    seconds = stamps[-1] - stamps[0]
    return {"tokens": generated, "tokens_per_s": round((generated - 1) / seconds, 2), "seconds": round(seconds, 3)}


def measure_served(model: Path, quantization: str | None, meanwhile: Callable[[], dict] | None = None) -> dict:
    """Serve ``model`` (with ``--quantization`` where given), ask the demo questions, time one decode, stop.
    ``meanwhile`` (other work, e.g. a perplexity run) runs while the server starts and ends before any request,
    so it never shares the CPU with the measured decode; its result is returned under "meanwhile"."""
    args = (["--quantization", quantization] if quantization else []) + SERVE_ARGS
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(meanwhile) if meanwhile else None
        srv = VllmServer(model, args)
        try:
            srv.start()
            log.info("vllm serve %s ready in %.1f s", model, srv.startup_s)
            side = {"meanwhile": other.result() if other else None}
            side["answers"] = chat_answers(srv)
            log.info("%s: %d of %d answers right", model, sum(a["right"] for a in side["answers"]),
                     len(side["answers"]))
            side["decode"] = decode_speed(srv)
            log.info("%s: %.1f tokens/s decode", model, side["decode"]["tokens_per_s"])
        finally:
            srv.stop()
    side.update(startup_s=round(srv.startup_s, 1), load=loadavg(), date=time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                       time.gmtime()))
    return side
