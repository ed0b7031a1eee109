"""Where a training step's time goes, from torch.profiler on every rank.

The loop marks its phases with record_function ranges (megagpt.data,
megagpt.forward, megagpt.backward, megagpt.step); collectives are found by
name (all_gather, reduce_scatter, all_reduce, broadcast) among the profiled
ops.  The summary attributes each collective to communication and the rest
of forward / backward to compute, per step, in seconds.  (On gloo, ZeRO's
gradient reduction shows as all_reduce; the loop's own small all-reduces
for agreement and metrics are counted there too, but only collectives inside
forward / backward are taken out of compute.)
"""

from __future__ import annotations

import json
import os
import time

import torch

PHASES = ("megagpt.data", "megagpt.forward", "megagpt.backward", "megagpt.step")
COLLECTIVES = {
    "all_gather": ("all_gather", "allgather", "_allgather_base"),
    "reduce_scatter": ("reduce_scatter", "reducescatter", "_reduce_scatter_base"),
    "all_reduce": ("all_reduce", "allreduce"),
    "broadcast": ("broadcast",),
}


class StepProfiler:
    """Profiles steps start+1 .. start+n (counted by `step_done`) and writes the summary."""

    def __init__(self, out_dir: str, rank: int, start: int, steps: int):
        self.out_dir, self.rank, self.start, self.steps = out_dir, rank, start, steps
        self.prof = None
        self.t0 = 0.0
        self.done = steps <= 0

    def before_step(self, step: int) -> None:
        """`step`: the step about to run (1-based)."""
        if self.done or self.prof is not None or step != self.start + 1:
            return
        acts = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=acts)
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def after_step(self, step: int) -> None:
        if self.prof is None or step < self.start + self.steps:
            return
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        summary = summarize(self.prof.events(), wall, self.steps)
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"rank{self.rank}.json"), "w") as f:
            json.dump(summary, f, indent=1)
        self.prof, self.done = None, True


def summarize(events, wall: float, steps: int) -> dict:
    """Seconds per step: wall, the loop's phases, each kind of collective, and
    compute.  `events`: the profiler's raw events (each with its time range).

    compute is forward + backward less the collectives that ran *inside*
    them (ZeRO-3's parameter gathers, the gradient reduction); the loop's own
    collectives between phases (agreement on errors, metrics) are not
    subtracted, so that time a rank spends waiting there for a slower one
    never hides its compute."""
    phase = {p: 0.0 for p in PHASES}
    comm = {k: 0.0 for k in COLLECTIVES}
    inside = 0.0
    spans = []  # (start, end) of every forward / backward range, in microseconds
    for e in events:
        if e.name in phase:
            phase[e.name] += e.cpu_time_total / 1e6  # microseconds -> seconds, summed over calls
            if e.name in ("megagpt.forward", "megagpt.backward"):
                spans.append((e.time_range.start, e.time_range.end))
    # The backends' own events (gloo:all_gather, nccl:all_reduce...) hold the
    # time of the collective; the c10d:: ops around them only enqueue it.
    backend = [e for e in events if e.name.lower().startswith(("gloo:", "nccl:"))]
    for e in backend or [e for e in events if e.name.lower().startswith("c10d::")]:
        low = e.name.lower()
        for kind, keys in COLLECTIVES.items():
            if any(k in low for k in keys):
                comm[kind] += e.cpu_time_total / 1e6
                if kind != "broadcast" and any(a <= e.time_range.start and e.time_range.end <= b for a, b in spans):
                    inside += e.cpu_time_total / 1e6
                break
    per = {k: v / steps for k, v in phase.items()}
    comm_per = {k: v / steps for k, v in comm.items()}
    fwd_bwd = per["megagpt.forward"] + per["megagpt.backward"]
    return {
        "steps": steps,
        "wall_per_step": wall / steps,
        "data_wait": per["megagpt.data"],
        "forward": per["megagpt.forward"],
        "backward": per["megagpt.backward"],
        "optimizer_step": per["megagpt.step"],
        "all_gather": comm_per["all_gather"],
        "reduce_scatter": comm_per["reduce_scatter"],
        "all_reduce": comm_per["all_reduce"],
        "broadcast": comm_per["broadcast"],
        "compute": max(0.0, fwd_bwd - min(fwd_bwd, inside / steps)),
    }
