"""No host synchronisation inside a training step.

Every call that brings a tensor's value to the host (`item`, `tolist`,
`cpu`, `numpy`, `float()`, `int()`, `bool()`) is counted while the real
training loop (megagpt.run.build: data, engine, hooks, all of it) runs on two
in-process gloo ranks, and attributed to the innermost megagpt or DeepSpeed
frame that made it.  megagpt's own code may read the host once per step (the
step's agreed outcome); DeepSpeed's reads are reported, not limited (ZeRO's
own gradient norm and checks: a target for the GPU work).  On CPU such a read
costs nothing, but the count is the one a GPU would pay in stalls.
"""

from __future__ import annotations

import collections
import json
import sys

import pytest
import torch
from distributed import run_distributed
from helpers import make_dataset

READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")
STEPS = 6  # logged and saved at the last step only: steps 2..5 are plain steps


class HostReads:
    """Counts host reads by (owner, where, method) while installed."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self._originals: dict = {}

    def install(self) -> None:
        for name in READS:
            self._originals[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counted(name, self._originals[name]))

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)

    def _counted(self, name, original):
        def counted(tensor, *args, **kwargs):
            self._record(name)
            return original(tensor, *args, **kwargs)

        return counted

    def _record(self, name: str) -> None:
        frame = sys._getframe(2)
        while frame is not None:
            module = frame.f_globals.get("__name__", "")
            if module.startswith(("megagpt", "deepspeed")):
                self.counts[(module.split(".")[0], f"{module}:{frame.f_lineno} {name}")] += 1
                return
            frame = frame.f_back
        self.counts[("other", name)] += 1


class StepStart:
    """First in the hook list: notes the counts before the step's data is fetched."""

    name = None

    def __init__(self, reads: HostReads):
        self.reads, self.before = reads, collections.Counter()

    def on_start(self, loop): ...

    def before_step(self, loop):
        self.before = collections.Counter(self.reads.counts)

    def after_step(self, loop, result, outcome, record): ...

    def on_rollback(self, loop): ...

    def close(self): ...


class StepEnd(StepStart):
    """Last in the hook list: what the step added, every hook included."""

    def __init__(self, start: StepStart):
        super().__init__(start.reads)
        self.start, self.per_step = start, []

    def before_step(self, loop): ...

    def after_step(self, loop, result, outcome, record):
        added = self.reads.counts - self.start.before
        self.per_step.append(
            {
                owner: {where: n for (o, where), n in added.items() if o == owner}
                for owner in ("megagpt", "deepspeed", "other")
            }
        )


def _count_reads(rank: int, world: int, data_dir: str, run_dir: str, stage: int) -> list[dict]:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from megagpt import run as runs
    from megagpt.config import register
    from megagpt.train import CONF_DIR

    register()
    overrides = [
        "data=webdataset",
        f"data.urls={data_dir}",
        "data.seq_len=32",
        "model.n_layer=2",
        "model.n_head=4",
        "model.n_embd=64",
        "trainer.micro_batch_size=4",
        "trainer.grad_accum=2",
        f"trainer.max_steps={STEPS}",
        f"trainer.save_every={STEPS}",
        f"trainer.log_every={STEPS}",
        "trainer.eval_every=0",
        "logger=none",
        f"deepspeed=zero{stage}",
        f"run.dir={run_dir}",
        "trainer.peak_flops=1e11",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose("config", overrides=overrides))
    run = runs.build(cfg)
    reads = HostReads()
    start = StepStart(reads)
    end = StepEnd(start)
    run.loop.hooks = [start, *run.loop.hooks, end]
    reads.install()
    try:
        run.train()
    finally:
        reads.uninstall()
        run.close()
        run.release()
    return end.per_step


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("reads"), n_docs=120, docs_per_shard=8)


@pytest.mark.parametrize("stage", [0, 3])
def test_megagpt_reads_the_host_once_per_step(data_dir, tmp_path, stage):
    per_rank = run_distributed(_count_reads, str(data_dir), str(tmp_path / "run"), stage, timeout=240)
    report = {}
    for rank, steps in enumerate(per_rank):
        assert len(steps) == STEPS
        plain = steps[1:-1]  # the first step warms up; the last one logs and saves
        for step, reads in enumerate(plain, start=2):
            ours = sum(reads["megagpt"].values())
            assert ours <= 1, f"ZeRO-{stage} rank {rank} step {step}: megagpt read the host {ours} times: {reads}"
            assert not reads["other"], reads["other"]
        report[f"rank{rank}"] = {
            "megagpt": plain[-1]["megagpt"],
            "deepspeed": plain[-1]["deepspeed"],
            "deepspeed_per_step": [sum(r["deepspeed"].values()) for r in plain],
        }
    print(f"\nhost reads per plain step, ZeRO-{stage}:\n" + json.dumps(report, indent=1))
