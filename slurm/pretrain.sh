#!/bin/bash
# Multi-node pretraining on SLURM: one torchrun per node, c10d rendezvous on
# the first node, Hydra overrides passed through.
#
#   sbatch --nodes=4 --gpus-per-node=8 slurm/pretrain.sh model=tiny trainer.max_steps=1000
#
# GPUs are requested on the sbatch command line so the same script runs on a
# CPU-only cluster: there, leave --gpus-per-node out and set the processes per
# node with MEGAGPT_NPROC_PER_NODE (e.g. `sbatch --export=ALL,MEGAGPT_NPROC_PER_NODE=2 ...`).
# Environment knobs:
#   MEGAGPT_NPROC_PER_NODE  processes per node (default: GPUs on the node, else 1)
#   MEGAGPT_RDZV_HOST       rendezvous host (default: this batch host's name)
#   MEGAGPT_RDZV_PORT       rendezvous port (default: 29500 + job id mod 1000)
#   MEGAGPT_PYTHON          python with megagpt installed (default: python3)
#SBATCH --job-name=megagpt
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail

: "${SLURM_JOB_ID:?run this script with sbatch}"
NNODES="${SLURM_NNODES:-1}"
# SLURM_GPUS_ON_NODE is set when GPUs were requested; CPU clusters set the count.
NPROC="${MEGAGPT_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
# The batch script runs on the first node of the allocation: its own host
# name is an address every node can resolve (node names may not be).
RDZV_HOST="${MEGAGPT_RDZV_HOST:-$(hostname)}"
RDZV_PORT="${MEGAGPT_RDZV_PORT:-$((29500 + SLURM_JOB_ID % 1000))}"
PYTHON="${MEGAGPT_PYTHON:-python3}"

echo "megagpt: job ${SLURM_JOB_ID} on ${NNODES} node(s) x ${NPROC} process(es), rendezvous ${RDZV_HOST}:${RDZV_PORT}"

# One task per node; each starts torchrun, which starts NPROC ranks. The job id
# is the rendezvous id and (via SLURM_JOB_ID) names run.dir, so a requeued job
# resumes in the same directory.
srun --kill-on-bad-exit=1 --ntasks-per-node=1 \
    "${PYTHON}" -m torch.distributed.run \
    --nnodes="${NNODES}" \
    --nproc_per_node="${NPROC}" \
    --rdzv_id="${SLURM_JOB_ID}" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="${RDZV_HOST}:${RDZV_PORT}" \
    -m megagpt.train "$@"
