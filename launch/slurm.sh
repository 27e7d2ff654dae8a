#!/bin/bash
# Submit a poet_jax training job to SLURM (wraps sbatch launch/slurm.sbatch).
#
# Usage:
#   launch/slurm.sh [--nodes N] [--gpus-per-node G] [--per node|gpu] [--partition P] [--account A]
#                   [--time HH:MM:SS] [--job-name NAME] [--output PATH] [--port PORT]
#                   [--sbatch-arg ARG ...] [--dry-run] CONFIG.yaml [key=value ...]
#
#   --nodes N           nodes (default 1)
#   --gpus-per-node G   GPUs per node to request (default 8; 0 = request none, CPU job)
#   --per node|gpu      one process per node using all its GPUs (default), or one per GPU
#   --partition, --account, --time, --job-name, --output   passed to sbatch (account/partition
#                       come from flags only: nothing cluster-specific is embedded here)
#   --port PORT         coordinator port (default: derived from the job id)
#   --sbatch-arg ARG    any extra sbatch option, repeatable (e.g. --sbatch-arg=--exclusive)
#   --dry-run           print the sbatch command and exit
#
# The job itself is launch/slurm.sbatch (see there for how processes find each other).
# Checkpoints go to train.output_dir: use a shared file system so any node can resume.
#
# Example:
#   launch/slurm.sh --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 \
#     configs/paper/llama3-8b-base-dpo-poet.yaml train.output_dir=/shared/runs/llama3_dpo_poet
set -euo pipefail

die() { echo "slurm.sh: error: $*" >&2; exit 2; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NODES=1; GPUS=8; PER=node; PARTITION=""; ACCOUNT=""; TIME=""; JOB_NAME=poet-jax; OUTPUT=""; PORT=""
EXTRA=(); DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) need "$@"; NODES="$2"; shift 2 ;;
    --gpus-per-node) need "$@"; GPUS="$2"; shift 2 ;;
    --per) need "$@"; PER="$2"; shift 2 ;;
    --partition) need "$@"; PARTITION="$2"; shift 2 ;;
    --account) need "$@"; ACCOUNT="$2"; shift 2 ;;
    --time) need "$@"; TIME="$2"; shift 2 ;;
    --job-name) need "$@"; JOB_NAME="$2"; shift 2 ;;
    --output) need "$@"; OUTPUT="$2"; shift 2 ;;
    --port) need "$@"; PORT="$2"; shift 2 ;;
    --sbatch-arg) need "$@"; EXTRA+=("$2"); shift 2 ;;
    --sbatch-arg=*) EXTRA+=("${1#--sbatch-arg=}"); shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || die "missing CONFIG.yaml (usage: launch/slurm.sh [options] CONFIG.yaml [key=value ...])"
CONFIG="$1"; shift
[[ -f "$CONFIG" ]] || die "CONFIG '$CONFIG' does not exist"
for o in "$@"; do [[ "$o" == *=* ]] || die "override '$o' is not key=value"; done
is_uint "$NODES" && (( NODES >= 1 )) || die "--nodes must be a positive integer, got '$NODES'"
is_uint "$GPUS" || die "--gpus-per-node must be a non-negative integer, got '$GPUS'"
case "$PER" in
  node) TPN=1 ;;
  gpu) (( GPUS >= 1 )) || die "--per gpu needs --gpus-per-node >= 1"; TPN="$GPUS" ;;
  *) die "--per must be 'node' or 'gpu', got '$PER'" ;;
esac
if [[ -n "$PORT" ]]; then
  is_uint "$PORT" && (( PORT >= 1 && PORT <= 65535 )) || die "--port must be in 1..65535, got '$PORT'"
fi
[[ "$JOB_NAME" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--job-name may use letters, digits, '_', '.', '-', got '$JOB_NAME'"

EXPORT="ALL,POET_JAX_SLURM_MODE=$PER,POET_JAX_GPUS_PER_NODE=$GPUS"
[[ -n "$PORT" ]] && EXPORT+=",POET_JAX_PORT=$PORT"
CMD=(sbatch --nodes="$NODES" --ntasks-per-node="$TPN" --job-name="$JOB_NAME")
(( GPUS > 0 )) && CMD+=(--gpus-per-node="$GPUS")
[[ -n "$PARTITION" ]] && CMD+=(--partition="$PARTITION")
[[ -n "$ACCOUNT" ]] && CMD+=(--account="$ACCOUNT")
[[ -n "$TIME" ]] && CMD+=(--time="$TIME")
[[ -n "$OUTPUT" ]] && CMD+=(--output="$OUTPUT")
CMD+=("${EXTRA[@]}" --export="$EXPORT" "$HERE/slurm.sbatch" "$CONFIG" "$@")

if (( DRY_RUN )); then
  printf '%q ' "${CMD[@]}" | sed 's/ $//'
  echo
  exit 0
fi
exec "${CMD[@]}"
