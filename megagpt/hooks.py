"""The parts of the training loop that decide for themselves when to act.

The loop (megagpt/loop.py) calls its hooks at the start, before and after
every step, after a rollback and at the end, in the order of their phases
(`Phase`, `in_order`): each hook declares its phase, and a hook may rely on
what the hooks of earlier phases did in the same call, never on a later one.
A hook keeps its own state; one whose state must survive a restart has a
`name` and `state_dict()` / `load_state_dict()`, saved with the checkpoint.

After a step, the hooks of phase MEASURE add what they measure to one record
(a flat dict), which `MetricsWriter` (phase REPORT) hands to metrics.jsonl,
W&B and the console.
"""

from __future__ import annotations

import enum
import logging
import os
import resource
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch

from megagpt import collectives
from megagpt.metrics import MetricsSink, console, progress_line
from megagpt.profiling import StepProfiler
from megagpt.resilience import Watchdog

if TYPE_CHECKING:  # the loop imports the hooks, never the other way at run time
    from megagpt.engine import StepOutcome, StepResult
    from megagpt.loop import Loop

log = logging.getLogger("megagpt")


class Phase(enum.IntEnum):
    """Where a hook acts among the others.  In each call (on_start, before_step,
    after_step, on_rollback, close) the hooks run phase by phase, so each may
    rely on what the earlier phases did:"""

    PREPARE = 0  # before the step's data is fetched: the profiler's step opens (Profile)
    OBSERVE = 1  # counts the step's events in loop.state.counters (SpikeWatch)
    MEASURE = 2  # adds the step's metrics to the record, those counters included (Throughput, Evaluation)
    REPORT = 3  # hands the record on: metrics.jsonl, W&B, the console (MetricsWriter)
    STOP = 4  # a stop request: saves, then ends the loop (loop.stopped) (StopAndRequeue)
    SAVE = 5  # the checkpoint due at this step, unless the loop stopped (CheckpointPolicy)
    DONE = 6  # the step is over, saves included (WatchdogHook)


def in_order(hooks: Iterable) -> list:
    """The hooks sorted by phase, in the given order within a phase; a hook
    that declares no phase is a TypeError."""
    hooks = list(hooks)
    for hook in hooks:
        if not isinstance(getattr(hook, "phase", None), Phase):
            raise TypeError(f"hook {type(hook).__name__} declares no phase (hooks.Phase)")
    return sorted(hooks, key=lambda hook: hook.phase)


class Hook:
    """Every method is optional; `phase` is not."""

    name: str | None = None  # its key in checkpoints, for hooks with state
    phase: Phase  # where it acts among the others

    def on_start(self, loop: Loop) -> None: ...

    def before_step(self, loop: Loop) -> None: ...

    def after_step(self, loop: Loop, result: StepResult, outcome: StepOutcome, record: dict) -> None: ...

    def on_rollback(self, loop: Loop) -> None: ...

    def close(self) -> None: ...


def due(step: int, every: int, last: int) -> bool:
    return bool(every) and (step % every == 0 or step == last)


class Profile(Hook):
    """torch.profiler over trainer.profile_steps steps (see profiling.py)."""

    phase = Phase.PREPARE

    def __init__(self, run_dir: str, rank: int, start: int, steps: int):
        self.profiler = StepProfiler(os.path.join(run_dir, "profile"), rank, start, steps)

    def before_step(self, loop):
        self.profiler.before_step(loop.state.step + 1)

    def after_step(self, loop, result, outcome, record):
        self.profiler.after_step(loop.state.step)


class CompileReport(Hook):
    """With a compiled model (model.compile), after this process's first step:
    how many graphs Dynamo built and how often it broke one (each break is a
    piece compiled apart, with a trip through Python between), and how long
    the step took with compiling.  Main rank only."""

    phase = Phase.MEASURE  # its line comes before the step's progress line

    def __init__(self):
        self.started: float | None = None
        self.done = False

    def before_step(self, loop):
        if self.started is None:
            self.started = time.perf_counter()

    def after_step(self, loop, result, outcome, record):
        if self.done:
            return
        self.done = True
        from torch._dynamo.utils import counters

        breaks = sum(counters["graph_break"].values())
        console(
            f"compiled: {counters['stats']['unique_graphs']} graph(s), {breaks} graph break(s); the first "
            f"step took {time.perf_counter() - self.started:.1f} s, compiling included"
        )


class SpikeWatch(Hook):
    """A loss above spike_factor x the mean of the last spike_window finite
    losses is logged as a spike and counted.  The window is checkpointed, so a
    resumed run sees the spikes the uninterrupted one sees."""

    name = "spikes"
    phase = Phase.OBSERVE

    def __init__(self, factor: float, window: int, is_main: bool):
        self.factor, self.is_main = factor, is_main
        self.recent: deque[float] = deque(maxlen=window)

    def after_step(self, loop, result, outcome, record):
        loss = outcome.mean_loss
        if outcome.skipped or not np.isfinite(loss):
            return
        full = len(self.recent) == self.recent.maxlen
        mean = sum(self.recent) / len(self.recent) if self.recent else 0.0
        self.recent.append(loss)
        if full and self.factor > 0 and loss > self.factor * mean:
            loop.state.counters.loss_spikes += 1
            if self.is_main:
                log.warning(
                    "step %d: loss spike: %.4f is above %.2f x the mean of the last %d steps",
                    loop.state.step,
                    loss,
                    self.factor,
                    self.recent.maxlen,
                )

    def state_dict(self) -> dict:
        return {"recent": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        self.recent.extend(float(x) for x in state["recent"])


class Throughput(Hook):
    """Every trainer.log_every steps (and at the last): the mean loss, learning
    rate, gradient norm, tokens/s, MFU, step time, data wait, memory and the
    event counters of the window.  Losses are summed on the device and, with
    the data counters, exchanged between ranks once per window.  Reads the data
    loader's and the checkpointer's public counters (Batches.wait_time,
    .skipped_shards, .source_counts, ...; Checkpointer.blocked)."""

    phase = Phase.MEASURE

    def __init__(
        self,
        log_every: int,
        max_steps: int,
        tokens_per_step: int,
        flops_per_token: float,
        peak_flops: float,
        world_size: int,
        device: torch.device,
    ):
        self.log_every, self.max_steps, self.tokens_per_step = log_every, max_steps, tokens_per_step
        self.flops_per_token, self.peak_flops, self.world_size = flops_per_token, peak_flops, world_size
        self.device = device
        self.blocked0 = 0.0

    def on_start(self, loop):
        self._new_window(loop)
        self._started, self._first_step = time.perf_counter(), loop.state.step

    def on_rollback(self, loop):
        self.on_start(loop)

    def _new_window(self, loop) -> None:
        self._t0, self._steps, self._wait0 = time.perf_counter(), 0, loop.batches.wait_time
        self._loss = torch.zeros((), dtype=torch.float64, device=self.device)

    def after_step(self, loop, result, outcome, record):
        if not outcome.skipped:
            self._loss = self._loss + result.loss  # this rank's; on the device
            self._steps += 1
        step = loop.state.step
        if not (self._steps and (step % self.log_every == 0 or step == self.max_steps)):
            return
        now = time.perf_counter()
        data = loop.batches
        local = torch.cat(
            [
                torch.stack([self._loss / self._steps]),
                torch.tensor(
                    [data.wait_time - self._wait0, data.skipped_shards, *data.source_counts], dtype=torch.float64
                ).to(self.device),
            ]
        )
        sums = collectives.sum_(local).cpu().numpy()  # once per log window
        elapsed, steps, counters = now - self._t0, self._steps, loop.state.counters
        tokens_per_sec = steps * self.tokens_per_step / elapsed
        record.update(
            {
                "step": step,
                "loss": float(sums[0] / self.world_size),
                "lr": result.lr,
                "grad_norm": loop.engine.logged_grad_norm(result),
                "tokens_per_sec": tokens_per_sec,
                "tokens_seen": loop.state.tokens_seen,
                "mfu": self.flops_per_token * tokens_per_sec / (self.peak_flops * self.world_size),
                "step_time": elapsed / steps,
                "data_wait": float(sums[1] / self.world_size / steps),
                "data_skipped_shards": int(sums[2]),
                "data_epoch": data.data_epoch,  # a function of the position: the same on every rank
                "memory_gb": _memory_gb(self.device),
                "eta_sec": (self.max_steps - step) * (now - self._started) / max(1, step - self._first_step),
                "save_blocked_sec": loop.checkpointer.blocked - self.blocked0,
                "skipped_steps": counters.skipped_steps,
                "loss_spikes": counters.loss_spikes,
                "rollbacks": counters.rollbacks,
            }
        )
        self.blocked0 = loop.checkpointer.blocked
        if len(data.source_names) > 1:  # realized proportions since this process started
            counts = sums[3:]
            record.update({f"mix/{n}": float(c / max(1, counts.sum())) for n, c in zip(data.source_names, counts)})
            record.update({f"data_epoch/{n}": e for n, e in data.data_epochs.items()})
        self._new_window(loop)


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


class Evaluation(Hook):
    """Every trainer.eval_every steps (and at the last): the mean loss on a
    fixed set of held-out sequences per source, the same eval_batches
    micro-batches on every rank at every evaluation."""

    phase = Phase.MEASURE

    def __init__(
        self,
        every: int,
        max_steps: int,
        batches: int,
        micro_batch: int,
        val_sets,
        world_size: int,
        device: torch.device,
    ):
        self.every, self.max_steps, self.batches, self.micro_batch = every, max_steps, batches, micro_batch
        self.val_sets, self.world_size, self.device = val_sets, world_size, device  # val_sets: () -> {name: seqs}
        self._sequences: dict[str, list[np.ndarray]] | None = None

    def after_step(self, loop, result, outcome, record):
        if not due(loop.state.step, self.every, self.max_steps):
            return
        if self._sequences is None:
            self._sequences = self.val_sets()
        if not self._sequences:
            return
        local = []  # this rank's mean loss per source
        for seqs in self._sequences.values():
            mb = self.micro_batch
            batches = [torch.from_numpy(np.stack(seqs[i * mb : (i + 1) * mb])) for i in range(self.batches)]
            local.append(np.mean(loop.engine.eval_losses(batches).tolist()))
        means = collectives.sum_(torch.tensor(local, dtype=torch.float64, device=self.device)).cpu().numpy()
        means = means / self.world_size
        per_source = {name: float(m) for name, m in zip(self._sequences, means)}
        record["step"] = loop.state.step
        record["val_loss"] = float(np.mean(list(per_source.values())))
        if len(per_source) > 1:
            record.update({f"val_loss/{k}": v for k, v in per_source.items()})


class MetricsWriter(Hook):
    """Hands each step's record, if any, to metrics.jsonl, W&B and the console
    (rank 0, which opens the sink when the loop starts: by then the step and
    the W&B run id of a resumed run are known); after a rollback
    metrics.jsonl drops the steps that will be re-run.  The record is complete
    here: the hooks that fill it act in the earlier phase MEASURE."""

    phase = Phase.REPORT

    def __init__(self, run_dir: str, logger_cfg, config: dict, max_steps: int, is_main: bool):
        self.run_dir, self.logger_cfg, self.config, self.max_steps = run_dir, logger_cfg, config, max_steps
        self.is_main = is_main
        self.sink: MetricsSink | None = None

    def on_start(self, loop):
        if self.is_main:
            self.sink = MetricsSink(self.run_dir, self.logger_cfg, self.config, loop.state.wandb_id, loop.state.step)

    def after_step(self, loop, result, outcome, record):
        if record and self.sink is not None:
            self.sink.log(record)
            console(progress_line(record, self.max_steps))

    def on_rollback(self, loop):
        if self.sink is not None:
            self.sink.rewind(loop.state.step)

    def close(self):
        if self.sink is not None:
            self.sink.close()
            self.sink = None


class StopAndRequeue(Hook):
    """When any rank was asked to stop (SIGUSR1, SIGTERM, the stop file: every
    rank knows from the step's exchange): save here, end the loop, and have
    the SLURM job requeued (by slurm/pretrain.sh once every rank has exited,
    or with `scontrol requeue` when run otherwise under SLURM).  It acts before
    CheckpointPolicy (phase STOP before SAVE), which then does not save again."""

    phase = Phase.STOP

    def __init__(self, stop, requeue: bool, is_main: bool, environ=os.environ):
        self.stop, self.requeue, self.is_main, self.environ = stop, requeue, is_main, environ

    def after_step(self, loop, result, outcome, record):
        if not outcome.stop:
            return
        reason = self.stop.local() or "another rank"
        if loop.checkpointer.saved_step != loop.state.step:
            loop.save()
        loop.checkpointer.wait()
        loop.stopped = reason
        if not self.is_main:
            return
        if self.stop.stop_file and os.path.exists(self.stop.stop_file):
            os.remove(self.stop.stop_file)  # honoured: the restarted run must not stop at once
        console(
            f"megagpt: stop requested ({reason}); checkpoint saved at step {loop.state.step}"
            f"{self._requeue(loop.state.step)}"
        )

    def _requeue(self, step: int) -> str:
        job = self.environ.get("SLURM_JOB_ID")
        if not (job and self.requeue):
            return ""
        request = self.environ.get("MEGAGPT_REQUEUE_FILE")
        if request:  # slurm/pretrain.sh requeues once srun has ended (every rank exited cleanly)
            with open(request, "w") as f:
                f.write(f"{step}\n")
            return f"; the batch script will requeue SLURM job {job}"
        import subprocess

        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        return (
            f"; requeued SLURM job {job}"
            if r.returncode == 0
            else f"; `scontrol requeue {job}` failed: {(r.stderr or r.stdout).strip()}"
        )


class CheckpointPolicy(Hook):
    """A checkpoint every trainer.save_every steps and at the last step, unless
    the loop stopped at this step: StopAndRequeue (an earlier phase) saved then."""

    phase = Phase.SAVE

    def __init__(self, every: int, max_steps: int):
        self.every, self.max_steps = every, max_steps

    def after_step(self, loop, result, outcome, record):
        if loop.stopped is None and due(loop.state.step, self.every, self.max_steps):
            loop.save()


class WatchdogHook(Hook):
    """Ends the process (exit code 70, every thread's stack on stderr) when no
    step has finished for trainer.watchdog_seconds (resilience.Watchdog).
    Last: a step's saves count as part of it."""

    phase = Phase.DONE

    def __init__(self, seconds: float, rank: int):
        self.seconds, self.rank = seconds, rank
        self.watchdog: Watchdog | None = None

    def on_start(self, loop):
        self.watchdog = Watchdog(self.seconds, self.rank)

    def after_step(self, loop, result, outcome, record):
        self.watchdog.beat()

    def on_rollback(self, loop):
        self.watchdog.beat()

    def close(self):
        if self.watchdog is not None:
            self.watchdog.close()
