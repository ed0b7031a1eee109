"""Two (or more) gloo ranks inside one pytest test: `run_distributed(fn, ...)`
starts `world_size` processes, sets each up as torchrun would (RANK,
WORLD_SIZE, MASTER_ADDR/PORT) with DeepSpeed's process group on gloo, runs
`fn(rank, world_size, *args)` in each and returns the ranks' results in rank
order.  An exception on any rank fails the test with that rank's traceback;
a rank that hangs fails it after `timeout` seconds.

For collectives and Stateful parts in seconds; whole jobs still run under
real torchrun (tests/helpers.py).  `fn` and its arguments must be picklable:
define `fn` at module level in the test file.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank: int, world_size: int, port: int, args: tuple, results) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "OMP_NUM_THREADS": "1",
        }
    )
    try:
        import torch

        from megagpt import runtime

        torch.set_num_threads(1)
        env = runtime.read_env()
        runtime.init_distributed(env, "gloo", torch.device("cpu"), timeout_minutes=2)
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - reported to the test, whatever it was
        results.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, *args, world_size: int = 2, timeout: float = 120.0) -> list:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, rank, world_size, port, args, results), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    by_rank: dict[int, object] = {}
    try:
        for _ in range(world_size):
            rank, ok, value = results.get(timeout=timeout)
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{value}")
            by_rank[rank] = value
    except queue.Empty:
        raise AssertionError(
            f"ranks {sorted(set(range(world_size)) - set(by_rank))} gave no result within {timeout:.0f} s (hung?)"
        ) from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [by_rank[r] for r in range(world_size)]
