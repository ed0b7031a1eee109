"""The parts of the benchmarks whose full runs are in the slow tier only
(`bench compile`, `cost`, `scaling`, `memory`), checked in the fast tier:
a row of the compile bench in eager mode, the parameter counts of `bench
cost`, the time breakdown of `bench scaling`, and the collective byte counter
of `bench memory` on a one-process gloo group."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO


@pytest.mark.parametrize("runner", ["megagpt", "transformers"])
def test_an_eager_compile_row_steps_without_graphs(runner):
    pytest.importorskip("transformers")
    from torch._dynamo.utils import counters

    from megagpt.bench.compile import row_main

    before = counters["stats"]["unique_graphs"]  # process-wide: earlier tests in this worker may have compiled
    row = row_main({"runner": runner, "mode": "eager", "layers": 1, "width": 32, "seq": 16, "batch": 2})
    assert row["graphs"] == before and row["first_step_s"] > 0 and row["step_ms"] > 0, row


@pytest.mark.parametrize("tied", [True, False])
def test_cost_counts_every_parameter_once_and_the_matmuls_without_lookups(tied):
    from megagpt.bench.cost import count_params
    from megagpt.model.gpt import GPT, GPTConfig

    c = GPTConfig(family="gpt2", vocab_size=64, max_seq_len=16, n_layer=2, n_head=2, n_embd=32, tie_embeddings=tied)
    model = GPT(c)
    unique = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in unique)
    lookups = model.wpe.weight.numel() + (0 if tied else model.wte.weight.numel())
    assert count_params(model) == (total, total - lookups)


def test_scaling_breakdown_adds_the_two_reductions():
    from megagpt.bench.scaling import _breakdown

    p = {"compute": 5.0, "all_gather": 1.0, "reduce_scatter": 0.5, "all_reduce": 0.25, "data_wait": 0.1}
    p |= {"optimizer_step": 0.2, "wall_per_step": 7.0}
    assert _breakdown(p) == {
        "compute": 5.0,
        "all_gather": 1.0,
        "reduce": 0.75,
        "data_wait": 0.1,
        "optimizer": 0.2,
        "wall": 7.0,
    }


COUNT_ON_ONE_RANK = """
import json, os, torch, torch.distributed as dist
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
from megagpt.bench.memory import CommCounter
c = CommCounter()
x = torch.ones(10)
dist.all_reduce(x)
dist.all_gather_into_tensor(torch.empty(10), x)
dist.broadcast(torch.ones(3, dtype=torch.float64), 0)
first = dict(c.bytes), dict(c.calls)
c.reset()
print(json.dumps([first, c.bytes]), flush=True)
dist.destroy_process_group()
os._exit(0)  # gloo's teardown at interpreter exit can abort ("terminate called without an active exception")
"""


def test_memory_comm_counter_counts_each_collectives_bytes():
    """In a child process: CommCounter wraps torch.distributed's functions for good."""
    r = subprocess.run([sys.executable, "-c", COUNT_ON_ONE_RANK], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    (counted, calls), after_reset = json.loads(r.stdout.splitlines()[-1])
    assert counted == {"all_gather": 40, "reduce_scatter": 0, "all_reduce": 40, "broadcast": 24}
    assert calls == {"all_gather": 1, "reduce_scatter": 0, "all_reduce": 1, "broadcast": 1}
    assert set(after_reset.values()) == {0}
