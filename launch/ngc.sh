#!/usr/bin/env bash
# Start an rlhf trainer on an NGC multi-node job: run this same command on every replica.
#
#   bash launch/ngc.sh rlhf.ppo --pretrain ... [trainer flags]
#
# It turns NGC's environment into one torchrun agent per node:
#   NGC_ARRAY_INDEX     this node's index (0 .. size-1)               default 0
#   NGC_ARRAY_SIZE      number of nodes (the job's replica count)     default 1
#   NGC_MASTER_ADDR     host of replica 0; required when size > 1
#   NGC_GPUS_PER_NODE   ranks per node; GPUS_PER_NODE overrides it; default: GPUs nvidia-smi
#                       lists, or 1 on a machine without GPUs
#   MASTER_PORT         rendezvous port on the master                  default 29500
#   RDZV_TIMEOUT        seconds to wait for every node to join         default 600
#   PYTHON              interpreter                                    default python
# The agents meet in a c10d rendezvous on NGC_MASTER_ADDR:MASTER_PORT (index 0 hosts it); a node
# that never arrives makes every agent fail after RDZV_TIMEOUT seconds instead of hanging.
# `--dry_run` as the first argument prints the torchrun command instead of running it.
set -euo pipefail

err() { echo "error: launch/ngc.sh: $*" >&2; exit 2; }

dry_run=0
if [ "${1:-}" = "--dry_run" ]; then dry_run=1; shift; fi
if [ "${1:-}" = "-m" ]; then shift; fi
[ $# -ge 1 ] || err "no trainer: usage: bash launch/ngc.sh rlhf.<trainer> [flags]"
module="$1"; shift
[[ "$module" =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]] || err "'$module' is not a module name: usage: bash launch/ngc.sh rlhf.<trainer> [flags]"

index="${NGC_ARRAY_INDEX:-0}"
size="${NGC_ARRAY_SIZE:-1}"
[[ "$index" =~ ^[0-9]+$ ]] || err "NGC_ARRAY_INDEX='$index' is not a non-negative integer"
[[ "$size" =~ ^[0-9]+$ && "$size" -ge 1 ]] || err "NGC_ARRAY_SIZE='$size' is not a positive integer"
[ "$index" -lt "$size" ] || err "NGC_ARRAY_INDEX=$index is not below NGC_ARRAY_SIZE=$size"
if [ "$size" -gt 1 ]; then
  [ -n "${NGC_MASTER_ADDR:-}" ] || err "NGC_ARRAY_SIZE=$size but NGC_MASTER_ADDR is not set (the host of replica 0): is this a multi-node job?"
  master="$NGC_MASTER_ADDR"
else
  master="${NGC_MASTER_ADDR:-127.0.0.1}"
fi
gpus="${GPUS_PER_NODE:-${NGC_GPUS_PER_NODE:-}}"
if [ -z "$gpus" ]; then
  gpus="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)"
  [ "$gpus" -ge 1 ] 2>/dev/null || gpus=1
fi
[[ "$gpus" =~ ^[0-9]+$ && "$gpus" -ge 1 ]] || err "GPUs per node '$gpus' is not a positive integer (GPUS_PER_NODE / NGC_GPUS_PER_NODE)"
port="${MASTER_PORT:-29500}"
is_host=0; [ "$index" = 0 ] && is_host=1

cmd=("${PYTHON:-python}" -m torch.distributed.run
  --nnodes "$size" --nproc_per_node "$gpus"
  --rdzv_backend c10d --rdzv_endpoint "$master:$port" --rdzv_id "${NGC_JOB_ID:-rlhf}"
  --rdzv_conf "join_timeout=${RDZV_TIMEOUT:-600},is_host=$is_host" --max_restarts 0
  -m "$module" "$@")
echo "launch/ngc.sh: node $index of $size, $gpus rank(s) per node, rendezvous $master:$port" >&2
if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
