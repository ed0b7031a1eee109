"""The training loop: fetch the data, take the step, apply the non-finite
policy, call the hooks.  Everything else (logging, evaluation, checkpoints,
stop requests, the watchdog, profiling) is a hook (megagpt/hooks.py), called
in the order of the phases the hooks declare (hooks.in_order); the step
itself is the engine's (megagpt/engine/).

Per step the loop reads one thing on the host: the step's agreed outcome
(mean loss, whether the update was skipped, whether any rank was asked to
stop or could not fetch its data), a single transfer of four numbers.
"""

from __future__ import annotations

import logging

from torch.profiler import record_function

from megagpt import checkpoint, collectives
from megagpt.data.shards import DataError
from megagpt.hooks import in_order
from megagpt.metrics import console
from megagpt.resilience import NanPolicy, StopRequest, TrainingDiverged
from megagpt.state import RngState, Snapshot, TrainState

log = logging.getLogger("megagpt")


class Loop:
    def __init__(
        self,
        *,
        engine,
        batches,
        state: TrainState,
        snapshot: Snapshot,
        rng: RngState,
        checkpointer: checkpoint.Checkpointer,
        hooks: list,
        nan_policy: NanPolicy,
        stop: StopRequest,
        max_steps: int,
        grad_accum: int,
        tokens_per_step: int,
        restore_args: dict,
        is_main: bool,
    ):
        self.engine, self.batches, self.state, self.snapshot, self.rng = engine, batches, state, snapshot, rng
        self.checkpointer, self.nan_policy, self.stop = checkpointer, nan_policy, stop
        self.hooks = in_order(hooks)  # by phase: each hook may rely on what the earlier phases did
        self.max_steps, self.grad_accum, self.tokens_per_step = max_steps, grad_accum, tokens_per_step
        self.restore_args, self.is_main = restore_args, is_main  # for checkpoint.restore on a rollback
        self.stopped: str | None = None  # why the loop ended early, if it did

    def run(self) -> TrainState:
        for hook in self.hooks:
            hook.on_start(self)
        while self.state.step < self.max_steps and self.stopped is None:
            for hook in self.hooks:
                hook.before_step(self)
            micro_batches, error = self.fetch()
            result = self.engine.train_batch(
                micro_batches, stop_requested=self.stop.local() is not None, data_failed=error is not None
            )
            outcome = result.read()  # the step's one host transfer
            if outcome.data_error:
                raise DataError(collectives.first_message(error))
            self.state.step += 1
            self.state.tokens_seen += self.tokens_per_step
            if outcome.skipped:
                if self.nan_policy.on_skipped(self.state, outcome.mean_loss) == "rollback":
                    self.rollback()
                    continue
            else:
                self.nan_policy.on_update()
            record: dict = {}
            for hook in self.hooks:
                hook.after_step(self, result, outcome, record)
        self.checkpointer.wait()
        return self.state

    def close(self) -> None:
        """After the loop, whichever way it ended (the caller reports an error
        first: closing can take seconds, e.g. W&B's upload)."""
        for hook in self.hooks:
            hook.close()
        self.stop.restore()

    def fetch(self) -> tuple[list, str | None]:
        """This step's micro-batches, (B, T + 1) windows each, and this rank's
        data error if it has one: the rank then passes stand-ins of the same
        shape so that every rank still meets in the step's collectives, and
        the step's exchange stops every rank with the same message."""
        micro_batches, error = [], None
        try:
            with record_function("megagpt.data"):
                for _ in range(self.grad_accum):
                    micro_batches.append(self.batches.next_windows())
        except DataError as e:
            error = f"rank {self.batches.rank}: {e}"
        except Exception as e:  # noqa: BLE001 - a loader crash must not leave the other ranks waiting
            error = f"rank {self.batches.rank}: data loader failed: {type(e).__name__}: {e}"
        if error is not None:
            micro_batches = [self.batches.stand_in() for _ in range(self.grad_accum)]
        return micro_batches, error

    def save(self) -> str:
        path = self.checkpointer.save(self.engine, self.state.step, self.snapshot.gather_state_dict(), self.rng)
        if self.is_main:
            c = self.checkpointer
            previous = c.last_waited_for_previous
            console(
                f"saved checkpoint {path}: training waited {c.last_blocked:.2f} s"
                + (f", {previous:.2f} s of it for the previous save's commit" if previous >= 0.005 else "")
                + (" (committing in the background)" if c.async_commit else "")
            )
        return path

    def rollback(self) -> None:
        """Back to the newest verified checkpoint: the engine, the RNG, the step.
        The data stream goes on from where it is, so the window that led here
        is not seen again; the event counters keep counting."""
        self.checkpointer.wait()
        root = self.checkpointer.root
        path = None
        if self.is_main:
            try:
                path = checkpoint.resolve_resume("auto", root)
            except checkpoint.CheckpointError:  # checkpoints, but none that verifies
                path = None
        path = collectives.broadcast_from_main(path)
        if path is None:
            raise TrainingDiverged(
                f"step {self.state.step}: non-finite loss or gradient and no checkpoint to roll back to"
            )
        saved = checkpoint.restore(path, engine=self.engine, rng=self.rng, **self.restore_args)
        resumed_at = int(saved["data"]["consumed"])
        if self.is_main:
            console(
                f"rollback: step {self.state.step} -> step {saved['step']} ({path}); the data stream "
                f"continues at sequence {self.batches.consumed}: sequences [{resumed_at}, "
                f"{self.batches.consumed}) are skipped"
            )
        self.state.counters.skipped_sequences += self.batches.consumed - resumed_at
        self.state.counters.rollbacks += 1
        self.state.rewind(saved)
        self.checkpointer.saved_step = self.state.step
        for hook in self.hooks:
            hook.on_rollback(self)
