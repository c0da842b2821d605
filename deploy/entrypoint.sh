#!/usr/bin/env bash
# Container entrypoint: serve an ARMOR checkpoint with vLLM's OpenAI-compatible server.
#
#   vllm serve "$MODEL_PATH" --quantization armor --host "$HOST" --port "$PORT" [env-derived flags] "$@"
#
# Environment (all optional):
#   MODEL_PATH              checkpoint folder (default /models/model, mount it read-only)
#   HOST, PORT              bind address and port (default 0.0.0.0 and 8000; the HEALTHCHECK reads PORT)
#   VLLM_API_KEY            bearer key for /v1/*. vLLM reads it from the environment itself; it is not put on
#                           the command line, where `ps` on the host and /proc/<pid>/cmdline would show it.
#   TENSOR_PARALLEL_SIZE    -> --tensor-parallel-size
#   MAX_MODEL_LEN           -> --max-model-len
#   GPU_MEMORY_UTILIZATION  -> --gpu-memory-utilization
#   SERVED_MODEL_NAME       -> --served-model-name (default: the model path)
#   VLLM_BIN                the vllm executable (default: `vllm` on PATH)
# Arguments given to the container are passed through to `vllm serve` last, so they win over the above.
set -euo pipefail

log() { printf '%s armor-entrypoint: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }
die() { log "error: $*"; exit 2; }

MODEL_PATH="${MODEL_PATH:-/models/model}"
HOST="${HOST:-0.0.0.0}"
PORT="${PORT:-8000}"
VLLM_BIN="${VLLM_BIN:-vllm}"

[[ -d "$MODEL_PATH" ]] || die "model folder $MODEL_PATH does not exist: mount an ARMOR checkpoint there (see deploy/README.md)"
[[ -f "$MODEL_PATH/config.json" ]] || die "$MODEL_PATH has no config.json: it is not a Hugging Face model folder"
grep -q '"quant_method": *"armor"' "$MODEL_PATH/config.json" \
  || die "$MODEL_PATH/config.json has no ARMOR quantization_config: prune the model with armor-prune first"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$PORT'"

args=(serve "$MODEL_PATH" --quantization armor --host "$HOST" --port "$PORT")
int_flag() {  # int_flag ENV_NAME --flag: append the flag when the variable is set, after checking it
  local name="$1" flag="$2" value="${!1:-}"
  [[ -z "$value" ]] && return 0
  [[ "$value" =~ ^[0-9]+$ ]] || die "$name must be a positive integer, got '$value'"
  args+=("$flag" "$value")
}
int_flag TENSOR_PARALLEL_SIZE --tensor-parallel-size
int_flag MAX_MODEL_LEN --max-model-len
if [[ -n "${GPU_MEMORY_UTILIZATION:-}" ]]; then
  [[ "$GPU_MEMORY_UTILIZATION" =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] \
    || die "GPU_MEMORY_UTILIZATION must be a fraction in (0, 1], got '$GPU_MEMORY_UTILIZATION'"
  args+=(--gpu-memory-utilization "$GPU_MEMORY_UTILIZATION")
fi
if [[ -n "${SERVED_MODEL_NAME:-}" ]]; then
  args+=(--served-model-name "$SERVED_MODEL_NAME")
fi
if [[ -n "${VLLM_API_KEY:-}" ]]; then
  log "API key set: /v1/* requires 'Authorization: Bearer <VLLM_API_KEY>'"
else
  log "warning: VLLM_API_KEY is not set, the API is open to anyone who can reach port $PORT"
fi

log "exec $VLLM_BIN ${args[*]} $*"
exec "$VLLM_BIN" "${args[@]}" "$@"
