#!/bin/bash
# Start this node's poet_jax process of a multi-node job, on clusters without SLURM.
# Run it once on every node (same CONFIG and overrides everywhere), one process per node;
# the process uses all local accelerators.
#
# Usage:
#   COORDINATOR=HOST[:PORT] NUM_NODES=N NODE_RANK=R launch/multinode.sh [--dry-run] CONFIG.yaml [key=value ...]
#
# Environment:
#   COORDINATOR       address of node 0 (rank 0 hosts the coordinator service), host or host:port
#   COORDINATOR_PORT  port when COORDINATOR has none (default 8476)
#   NUM_NODES         number of nodes (= processes), >= 1
#   NODE_RANK         this node's rank, 0 .. NUM_NODES-1
#   POET_JAX_TRAIN_CMD  program to start (default: poet-jax)
# They become POET_JAX_COORDINATOR_ADDRESS / POET_JAX_NUM_PROCESSES / POET_JAX_PROCESS_ID, read by
# poet_jax.distributed.initialize_from_env().  --dry-run prints the command instead of running it.
#
# Example (two nodes; 10.0.0.1 is node 0):
#   node 0:  COORDINATOR=10.0.0.1:8476 NUM_NODES=2 NODE_RANK=0 launch/multinode.sh configs/paper/mistral-7b-base-dpo-poet.yaml
#   node 1:  COORDINATOR=10.0.0.1:8476 NUM_NODES=2 NODE_RANK=1 launch/multinode.sh configs/paper/mistral-7b-base-dpo-poet.yaml
set -euo pipefail

die() { echo "multinode.sh: error: $*" >&2; exit 2; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
[[ $# -ge 1 ]] || die "missing CONFIG.yaml (usage: COORDINATOR=HOST:PORT NUM_NODES=N NODE_RANK=R launch/multinode.sh [--dry-run] CONFIG.yaml [key=value ...])"
[[ "$1" != -* ]] || die "unknown option '$1'"
[[ "$1" != *=* ]] || die "the first argument must be the CONFIG file, got the override '$1'"
[[ -n "${COORDINATOR:-}" ]] || die "COORDINATOR is not set (host or host:port of node 0)"
[[ -n "${NUM_NODES:-}" ]] || die "NUM_NODES is not set"
[[ -n "${NODE_RANK:-}" ]] || die "NODE_RANK is not set"
is_uint "$NUM_NODES" && (( NUM_NODES >= 1 )) || die "NUM_NODES must be a positive integer, got '$NUM_NODES'"
is_uint "$NODE_RANK" && (( NODE_RANK < NUM_NODES )) || die "NODE_RANK must be in 0..$((NUM_NODES - 1)), got '$NODE_RANK'"
ADDR="$COORDINATOR"
if [[ ! "$ADDR" =~ :[0-9]+$ ]]; then ADDR="$ADDR:${COORDINATOR_PORT:-8476}"; fi
[[ "$ADDR" =~ ^[A-Za-z0-9_.-]+:([0-9]+)$ ]] || die "COORDINATOR must be host or host:port, got '$COORDINATOR'"
PORT="${BASH_REMATCH[1]}"
(( PORT >= 1 && PORT <= 65535 )) || die "coordinator port must be in 1..65535, got '$PORT'"

ENVS=(POET_JAX_COORDINATOR_ADDRESS="$ADDR" POET_JAX_NUM_PROCESSES="$NUM_NODES" POET_JAX_PROCESS_ID="$NODE_RANK" PYTHONUNBUFFERED=1)
CMD=("${POET_JAX_TRAIN_CMD:-poet-jax}" train "$@")
if (( DRY_RUN )); then
  printf '%q ' env "${ENVS[@]}" "${CMD[@]}" | sed 's/ $//'
  echo
  exit 0
fi
exec env "${ENVS[@]}" "${CMD[@]}"
