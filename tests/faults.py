"""Faults the tests inject into real training jobs: a NaN or a spike in the
training loss, and a hang.  Production runs know nothing of them: a test
launches tests/fault_train.py, which runs megagpt.train with the hook below
added to the run's own (run.build's extra_hooks), and sets what to inject in
the job's environment:

  MEGAGPT_FAULT_NAN=R:A-B   rank R's loss is NaN for steps whose data
                            starts at global sequence position in [A, B)
                            (bad data: skipping the window cures it)
  MEGAGPT_FAULT_NAN_STEPS=R:S1,S2,...  rank R's loss is NaN at these steps
  MEGAGPT_FAULT_HANG=R:S    rank R stops making progress at step S
  MEGAGPT_FAULT_SPIKE_STEPS=R:S1,...  rank R's loss is multiplied by 10 at these steps
"""

from __future__ import annotations

import logging
import os
import time

import torch

from megagpt.hooks import Hook, Phase

log = logging.getLogger("megagpt")  # the run's own log: the tests read these lines with megagpt's


class Faults:
    """The faults MEGAGPT_FAULT_* asks of this rank."""

    def __init__(self, rank: int, environ=os.environ):
        self.rank = rank
        self.nan_window = self._parse(environ.get("MEGAGPT_FAULT_NAN"), lambda v: tuple(map(int, v.split("-"))))
        self.nan_steps = (
            self._parse(environ.get("MEGAGPT_FAULT_NAN_STEPS"), lambda v: {int(x) for x in v.split(",")}) or set()
        )
        self.hang_step = self._parse(environ.get("MEGAGPT_FAULT_HANG"), int)
        self.spike_steps = (
            self._parse(environ.get("MEGAGPT_FAULT_SPIKE_STEPS"), lambda v: {int(x) for x in v.split(",")}) or set()
        )
        if self.nan_window or self.nan_steps or self.hang_step or self.spike_steps:
            log.warning("fault injection active on rank %d (MEGAGPT_FAULT_*)", rank)

    def _parse(self, value: str | None, conv):
        if not value:
            return None
        r, _, rest = value.partition(":")
        return conv(rest) if int(r) == self.rank else None

    def nan(self, step: int, consumed: int) -> bool:
        if step in self.nan_steps:
            return True
        return bool(self.nan_window) and self.nan_window[0] <= consumed < self.nan_window[1]

    def maybe_hang(self, step: int) -> None:
        if self.hang_step is not None and step == self.hang_step:
            log.warning("fault injection: rank %d hangs at step %d", self.rank, step)
            while True:
                time.sleep(60)


class InjectFaults(Hook):
    """Faults (above) in a run: the loss altered through a forward hook on the
    model (the step itself knows nothing of them), a hang before a step."""

    phase = Phase.PREPARE

    def __init__(self, faults: Faults, model: torch.nn.Module):
        self.faults = faults
        self._nan = self._spike = False
        if faults.nan_window or faults.nan_steps or faults.spike_steps:
            model.register_forward_hook(self._alter_loss)

    def before_step(self, loop):
        step = loop.state.step + 1
        self._nan = self.faults.nan(step, loop.batches.consumed)
        self._spike = step in self.faults.spike_steps
        self.faults.maybe_hang(step)

    def _alter_loss(self, module, inputs, loss):
        if not module.training:  # evaluation is left alone
            return loss
        if self._nan:
            loss = loss * float("nan")
        if self._spike:
            loss = loss * 10.0
        return loss


def fault_hooks(env, engine) -> list[Hook]:
    """run.build's extra_hooks: this rank's faults, on the engine's model."""
    return [InjectFaults(Faults(env.rank), engine.model)]
