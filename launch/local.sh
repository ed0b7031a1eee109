#!/bin/bash
# Pretrain on this machine: torchrun with NPROC processes (default 2), Hydra
# overrides passed through, e.g.
#   launch/local.sh trainer.max_steps=50 model.n_layer=2
#   NPROC=1 launch/local.sh deepspeed=zero0
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${MEGAGPT_PYTHON:-python3}" -m torch.distributed.run --standalone \
    --nproc_per_node="${NPROC:-2}" -m megagpt.train "$@"
