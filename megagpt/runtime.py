"""Process-level setup: ranks, device, process group, threads, output directory.
(The collectives megagpt runs itself: collectives.py.)"""

from __future__ import annotations

import datetime
import os
import socket
import time
import uuid
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
    raise ValueError(
        "run.dir: not set and no shared job id (SLURM_JOB_ID, TORCHELASTIC_RUN_ID) to derive it from; set run.dir=PATH"
    )


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
    """The world process group (gloo on CPU, NCCL on CUDA for `auto`).  The
    engine's DeepSpeed adopts it when it builds (engine/groups.py)."""
    import torch.distributed as dist

    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if env.world_size == 1:  # a plain `python -m megagpt.train`: a group of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    if dist.is_initialized():  # a later point of a Hydra -m sweep in this process keeps the group
        return
    # Bound to this rank's GPU, NCCL connects at once; a group of one has no peer to connect to.
    options = {"device_id": device} if env.world_size > 1 and _binds_device(device) else {}
    if env.world_size > 1 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # Under torchrun the group meets in a store of this attempt's own, not
        # in the agent's (_attempt_store says why).
        dist.init_process_group(
            backend,
            store=_attempt_store(env, timeout),
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
            **options,
        )
    else:  # env://: MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE
        dist.init_process_group(backend, timeout=timeout, **options)


def _binds_device(device: torch.device) -> bool:
    """Whether the group is bound to this rank's GPU, as DeepSpeed binds the
    groups it makes (NCCL then connects at once), except on the torch versions
    where binding hangs (2.6.0 < torch < 2.7.1, DeepSpeed's own exception)."""
    return device.type == "cuda" and not "2.6.0" < torch.__version__ < "2.7.1"  # a TorchVersion: compares as versions


# The agent-store key where rank 0 publishes its attempt's store: "<address> <port> <token>".
_ANNOUNCE_KEY = "megagpt/attempt_store"
_TOKEN_KEY = "megagpt/token"
_PROBE = datetime.timedelta(seconds=2)  # to connect to an announced store and read its token


def _attempt_store(env: Env, timeout: datetime.timedelta):
    """A TCPStore that rank 0 starts for this attempt of the job, on a port of
    its own, and that the other ranks find through the torchrun agent's store.

    Why not the agent's store itself (what env:// gives a worker under torchrun
    since torch 2.5): the agent keeps one store for the whole run, across the
    restarts of --max-restarts, at the same MASTER_PORT, and nothing clears the
    keys the previous attempt's process group wrote there (torch no longer
    prefixes them per attempt).  A restarted rank then read a dead rank's
    address: gloo failed ("connectFullMesh failed ... Connection refused"), or
    the ranks waited in init_process_group until the timeout.
    TORCHELASTIC_RESTART_COUNT cannot name the attempt: each node's agent
    counts only its own failures.  A store is proven current by being alive:
    the announcement in the agent's store may be the previous attempt's, whose
    store died with its rank 0, so a rank connects to the announced one and
    checks the token it holds, and reads the announcement again until both agree."""
    from torch.distributed import DistError, TCPStore

    agent_host, agent_port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])  # the agent's store
    agent = TCPStore(agent_host, agent_port, is_master=False, timeout=timeout)
    if env.is_main:
        token = uuid.uuid4().hex
        store = TCPStore(agent_host, 0, is_master=True, timeout=timeout, wait_for_workers=False)
        store.set(_TOKEN_KEY, token)
        # Rank 0's address as the other ranks reach it: the rendezvous store need not run on its node.
        agent.set(_ANNOUNCE_KEY, f"{_address_towards(agent_host, agent_port)} {store.port} {token}")
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        host, port, token = agent.get(_ANNOUNCE_KEY).decode().split()
        # A dead store refuses at once (TCPStore's own client would retry until its timeout).
        if _accepts(host, int(port)):
            try:
                store = TCPStore(host, int(port), is_master=False, timeout=_PROBE)
                if store.get(_TOKEN_KEY).decode() == token:
                    store.set_timeout(timeout)
                    return store
            except DistError:  # another server took the dead store's port
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"rank {env.rank}: rank 0's store for this attempt did not come up at {host} "
                f"within {timeout} (deepspeed.timeout_minutes)"
            )
        time.sleep(0.2)


def _address_towards(host: str, port: int) -> str:
    """This machine's address on the route to host:port (no packet is sent: a UDP
    socket's connect only picks the route), so a rank on another node reaches it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, port))
            return s.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=_PROBE.total_seconds()):
            return True
    except OSError:
        return False


def wait_for_the_others_to_report(timeout: float = 10.0) -> None:
    """For a worker that stops the job on bad input, after printing its line and
    before exiting: wait (at most `timeout` s) until every worker has got as far.
    Under torchrun, the first worker to exit non-zero makes the agent SIGTERM the
    others, which may be a moment from printing the same line themselves (they
    check the same input at the same point, without a process group at the
    command line's check).  Each counts itself in the agent's store."""
    from torch.distributed import TCPStore

    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    run_id, attempt = os.environ.get("TORCHELASTIC_RUN_ID", ""), os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)
    key = f"megagpt/reported/{run_id}/{attempt}"
    deadline = time.monotonic() + timeout
    try:
        store = TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(seconds=timeout),
        )
        store.add(key, 1)
        while store.add(key, 0) < world and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception:  # noqa: BLE001 - an agent already gone: nobody left to wait for
        pass


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
