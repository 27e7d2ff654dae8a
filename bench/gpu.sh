#!/usr/bin/env bash
# poet_jax on one NVIDIA GPU (H200 class): ~1B Llama-3-shaped model, bf16, rows of 2048 tokens,
# DPO with a frozen reference and DPO+POET, cuDNN flash attention; prints MFU (true FLOP count),
# tokens/s and peak memory. Bounded to 8 minutes including the jax[cuda12] install.
#
#   bash bench/gpu.sh                 # on the GPU machine (installs jax[cuda12] if jax sees no GPU)
#   bash bench/gpu.sh --cpu           # tiny CPU-sized smoke run (what the tests run)
#   bash bench/gpu.sh --profile /tmp/trace   # extra: jax.profiler trace of 2 steps
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3), GPU_BENCH_TIMEOUT
# (seconds for the benchmark itself, default 420), OUT (if set, results JSON and log go there).
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi

CPU=0
for a in "$@"; do [[ "$a" == "--cpu" ]] && CPU=1; done

if [[ $CPU -eq 0 ]]; then
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  if ! "$PY" -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)" 2>/dev/null; then
    JV=$("$PY" -c "import jax; print(jax.__version__)" 2>/dev/null || echo "")
    echo "# jax sees no GPU: installing jax[cuda12]${JV:+==$JV}" >&2
    timeout 240 "$PY" -m pip install -q "jax[cuda12]${JV:+==$JV}" || {
      echo "error: could not install jax[cuda12] (no network or no wheel for this platform)" >&2; exit 3; }
  fi
  "$PY" -c "import flax, optax, numpy" 2>/dev/null || timeout 120 "$PY" -m pip install -q flax optax numpy
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
fi

LEFT=$(( 470 - ($(date +%s) - START) ))
BUDGET=${GPU_BENCH_TIMEOUT:-420}
(( BUDGET > LEFT )) && BUDGET=$LEFT
JSON_ARGS=()
if [[ -n "${OUT:-}" ]]; then mkdir -p "$OUT"; JSON_ARGS=(--json "$OUT/gpu_bench.json"); fi
echo "# $(date -u '+%Y-%m-%d %H:%M UTC') $(hostname) load $(cut -d' ' -f1-3 /proc/loadavg); budget ${BUDGET}s" >&2
exec timeout "$BUDGET" "$PY" bench/gpu_bench.py "${JSON_ARGS[@]}" "$@"
