#!/usr/bin/env bash
# Body shared by the sbatch templates (sourced by them, inside the job, after `TRAINER=...`):
# start the trainer module on every allocated node, then exit with its status.
#
# Two ways to place the ranks (RLHF_LAUNCH):
#   torchrun (default)  srun starts ONE torchrun agent per node; each starts NPROC_PER_NODE ranks;
#                       the agents meet in a c10d rendezvous on the first node of the job
#                       (`scontrol show hostnames`), port MASTER_PORT (default 20000 + job id % 20000).
#   tasks               srun starts one task per rank (submit with --ntasks-per-node=<GPUs>); each
#                       reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID itself (rlhf/distributed/env.py).
#
# Variables (all optional; pass them in the environment of `sbatch`, which exports it):
#   NPROC_PER_NODE   ranks per node (torchrun mode); default: GPUs SLURM gave the node, else 1
#   MASTER_ADDR      rendezvous host; default: first host of the job
#   MASTER_PORT      rendezvous port; default: 20000 + SLURM_JOB_ID % 20000
#   RDZV_TIMEOUT     seconds the rendezvous waits for every node before failing (default 600)
#   PYTHON           interpreter on the nodes (default: python)
#   SRUN_ARGS        extra srun options, e.g. a container (pyxis/enroot):
#                    SRUN_ARGS="--container-image=nvcr.io#nvidia/pytorch:25.01-py3 --container-mounts=$PWD:/workspace --container-workdir=/workspace"
#   RLHF_DIR         this repository, as seen from the nodes (default: the folder sbatch was called from);
#                    with a container, the mount and --container-workdir put it inside the container
set -euo pipefail

if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "error: slurm/launch_trainer.sh runs inside a SLURM job: submit with sbatch slurm/<trainer>.sbatch" >&2
  exit 2
fi
: "${TRAINER:?set TRAINER=rlhf.<module> before sourcing slurm/launch_trainer.sh}"
cd "${RLHF_DIR:-$SLURM_SUBMIT_DIR}"

PYTHON="${PYTHON:-python}"
nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
if [ -z "${MASTER_ADDR:-}" ]; then
  MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
fi
if [ -z "$MASTER_ADDR" ]; then
  echo "error: no master address: scontrol show hostnames '$SLURM_JOB_NODELIST' gave nothing; set MASTER_ADDR" >&2
  exit 2
fi
MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export MASTER_ADDR MASTER_PORT
gpus="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}"
gpus="${gpus##*:}"  # "a100:8" -> "8"
NPROC_PER_NODE="${NPROC_PER_NODE:-${gpus:-1}}"
RDZV_TIMEOUT="${RDZV_TIMEOUT:-600}"
# shellcheck disable=SC2206
srun_args=(${SRUN_ARGS:-})

echo "rlhf: job $SLURM_JOB_ID, $nodes node(s), launch ${RLHF_LAUNCH:-torchrun}, master $MASTER_ADDR:$MASTER_PORT: $TRAINER $*" >&2
case "${RLHF_LAUNCH:-torchrun}" in
  torchrun)
    exec srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 "${srun_args[@]}" \
      "$PYTHON" -m torch.distributed.run \
        --nnodes "$nodes" --nproc_per_node "$NPROC_PER_NODE" \
        --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" \
        --rdzv_conf "join_timeout=$RDZV_TIMEOUT" --max_restarts 0 \
        -m "$TRAINER" "$@"
    ;;
  tasks)
    exec srun --kill-on-bad-exit=1 "${srun_args[@]}" "$PYTHON" -m "$TRAINER" "$@"
    ;;
  *)
    echo "error: RLHF_LAUNCH=${RLHF_LAUNCH} is not one of: torchrun, tasks" >&2
    exit 2
    ;;
esac
