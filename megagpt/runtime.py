"""Process-level setup: ranks, device, process group, threads, output directory.
(The collectives megagpt runs itself: collectives.py.)"""

from __future__ import annotations

import datetime
import os
import socket
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Env:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_env() -> Env:
    """Rank layout from torchrun's variables; a plain `python -m` is one process."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    # srun without torchrun leaves LOCAL_WORLD_SIZE unset; SLURM's count stands in.
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", 1)))
    return Env(rank, world, local_rank, local_world)


def default_run_dir(env: Env, environ=os.environ, point: int | None = None) -> str:
    """An output directory every rank derives alike: from the SLURM job (stable
    across requeues) or the torchrun run id; never from a rank's own clock,
    except for a lone process, which has no one to disagree with.  `point`:
    the job number in a Hydra multirun whose points run one after another in
    this process (each gets its own directory)."""
    suffix = "" if point is None else f"-{point}"
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"outputs/slurm-{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"  # a job per point
    if environ.get("SLURM_JOB_ID"):
        return f"outputs/slurm-{environ['SLURM_JOB_ID']}{suffix}"
    run_id = environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        return f"outputs/torchrun-{run_id[:12]}{suffix}"
    if env.world_size == 1:
        return f"outputs/local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}{suffix}"
    raise ValueError("run.dir: not set and no shared job id (SLURM_JOB_ID, TORCHELASTIC_RUN_ID) "
                     "to derive it from; set run.dir=PATH")


def device_for(env: Env) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def set_cpu_threads(env: Env, configured: int | None) -> int:
    """Split the cores among the ranks on this node: 2 ranks x 2 threads on 2
    cores oversubscribe and run slower than 2 x 1."""
    n = configured or max(1, (os.cpu_count() or 1) // max(1, env.local_world_size))
    torch.set_num_threads(n)
    return n


def init_distributed(env: Env, backend: str, device: torch.device, timeout_minutes: int) -> None:
    import deepspeed

    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if env.world_size == 1:  # a plain `python -m megagpt.train`: a group of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=datetime.timedelta(minutes=timeout_minutes))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leave(code: int) -> None:
    """End the process group and exit with `code` without the interpreter's
    finalization.  gloo's worker threads may still be releasing the tensors
    of the last collective when the main thread exits; once finalization has
    begun, such a thread aborts the whole process (SIGABRT, "terminate called
    without an active exception": seen after a user error in 1 of 4 runs, and
    once in CI at the end of a bench worker), turning a clean exit into a
    crash the launcher reports.  Everything megagpt writes is closed before
    this (checkpoints committed, metrics and W&B closed); stdio and logging
    are flushed here."""
    import logging
    import sys

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
