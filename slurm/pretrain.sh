#!/bin/bash
# Multi-node pretraining on SLURM: one torchrun per node, c10d rendezvous on
# the first node, Hydra overrides passed through; checkpoint and requeue on
# SIGUSR1/SIGTERM, automatic resume after the requeue.
#
#   sbatch --nodes=4 --gpus-per-node=8 slurm/pretrain.sh model=tiny trainer.max_steps=1000
#
# GPUs are requested on the sbatch command line so the same script runs on a
# CPU-only cluster: there, leave --gpus-per-node out and set the processes per
# node with MEGAGPT_NPROC_PER_NODE (e.g. `sbatch --export=ALL,MEGAGPT_NPROC_PER_NODE=2 ...`);
# deepspeed.backend=auto then picks gloo.
# Environment knobs:
#   MEGAGPT_NPROC_PER_NODE  processes per node (default: GPUs on the node, else 1)
#   MEGAGPT_RDZV_HOST       rendezvous host (default: this batch host's name)
#   MEGAGPT_RDZV_PORT       rendezvous port (default: 29500 + job id mod 1000)
#   MEGAGPT_PYTHON          python with megagpt installed (default: python3)
#   MEGAGPT_STOP_FILE       stop-request file, on a filesystem every node sees
#                           (default: $SLURM_SUBMIT_DIR/.megagpt-stop-<job id>)
#
# Stop and requeue: SLURM sends USR1 to this batch shell (only: "B:") 120 s
# before the time limit, and TERM on preemption or scancel. The trap below
# creates MEGAGPT_STOP_FILE and keeps waiting for srun; every rank checks that
# file (and its own USR1/TERM) at each step boundary, they agree, save a
# checkpoint, rank 0 writes MEGAGPT_REQUEUE_FILE (trainer.requeue=true, the
# default), and all exit 0. Once srun has ended, this script sees that file and
# runs `scontrol requeue $SLURM_JOB_ID`. The requeued job (same job id, hence
# same run.dir) resumes from that checkpoint; --open-mode=append keeps both
# runs' output in one file.
#SBATCH --job-name=megagpt
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --signal=B:USR1@120
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
export MEGAGPT_STOP_FILE="${MEGAGPT_STOP_FILE:-${SLURM_SUBMIT_DIR:-$PWD}/.megagpt-stop-${SLURM_JOB_ID}}"
# Rank 0 asks for a requeue through this file once the stop checkpoint is
# saved; this script requeues after srun has ended, so no rank is killed
# while it shuts down.
export MEGAGPT_REQUEUE_FILE="${MEGAGPT_STOP_FILE}.requeue"
# A stop request belongs to the run that got it: a requeued run starts without one.
rm -f -- "${MEGAGPT_STOP_FILE}" "${MEGAGPT_REQUEUE_FILE}"

echo "megagpt: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${NNODES} node(s) x ${NPROC} process(es)," \
    "rendezvous ${RDZV_HOST}:${RDZV_PORT}, stop file ${MEGAGPT_STOP_FILE}"

got_signal=0
# Called by the traps below (shellcheck does not see calls inside trap strings).
# shellcheck disable=SC2329
request_stop() {
    got_signal=1
    echo "megagpt: batch shell got SIG$1: stop requested via ${MEGAGPT_STOP_FILE}"
    touch -- "${MEGAGPT_STOP_FILE}"
}
trap 'request_stop USR1' USR1
trap 'request_stop TERM' TERM

# One task per node; each starts torchrun, which starts NPROC ranks. The job id
# is the rendezvous id and (via SLURM_JOB_ID) names run.dir, so a requeued job
# resumes in the same directory. srun runs in the background so that the traps
# above run as soon as a signal arrives (bash defers traps while a foreground
# command runs).
srun --kill-on-bad-exit=1 --ntasks-per-node=1 \
    "${PYTHON}" -m torch.distributed.run \
    --nnodes="${NNODES}" \
    --nproc_per_node="${NPROC}" \
    --rdzv_id="${SLURM_JOB_ID}" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="${RDZV_HOST}:${RDZV_PORT}" \
    -m megagpt.train "$@" &
SRUN_PID=$!

# `wait` returns >128 when a trapped signal interrupts it: srun still runs then
# (the ranks are checkpointing), so wait again. bash keeps the status of a child
# that ended meanwhile, so the last `wait` returns srun's own exit status.
while :; do
    got_signal=0
    status=0
    wait "${SRUN_PID}" || status=$?
    if [ "${got_signal}" = 0 ] || [ "${status}" -le 128 ]; then
        break
    fi
    if ! kill -0 "${SRUN_PID}" 2>/dev/null; then
        status=0
        wait "${SRUN_PID}" || status=$?
        break
    fi
done
echo "megagpt: srun exited with status ${status}"
if [ -f "${MEGAGPT_REQUEUE_FILE}" ]; then
    rm -f -- "${MEGAGPT_REQUEUE_FILE}" "${MEGAGPT_STOP_FILE}"
    echo "megagpt: requeueing job ${SLURM_JOB_ID} (it resumes from the stop checkpoint)"
    scontrol requeue "${SLURM_JOB_ID}"
fi
exit "${status}"
