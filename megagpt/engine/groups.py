"""The process groups the engine trains over.

runtime.init_distributed brings up the world group (torch.distributed, with
its own store under torchrun: runtime._attempt_store says why).  DeepSpeed's
communication layer then adopts that group, as it adopts any group made
before it; DeepSpeed makes its own groups from it (ZeRO's partitions span the
world).  This is where the groups of a later parallelism (experts, sequences)
belong: made from the world group when the engine is built, kept on the
TrainEngine, never seen by the loop or the checkpointer.
"""

from __future__ import annotations


def join_process_group() -> None:
    """DeepSpeed's communication layer over the world group (once per process;
    a later engine in the same process, a point of a Hydra -m sweep, finds it
    up).  Called by build_engine before anything of DeepSpeed's runs."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("build_engine: no process group; call runtime.init_distributed first")
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
