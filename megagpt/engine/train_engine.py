"""`TrainEngine`: the DeepSpeed engine behind what the loop, the checkpointer
and the hooks call: one `train_batch` per optimizer step, `save` / `load` of
the engine's state, `eval_losses`, and the gradient norm for the log."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from megagpt import collectives
from megagpt.engine import faults
from megagpt.engine.checkpoint_files import EngineStateError, universal_copy
from megagpt.engine.optimizer import GuardedAdamW

# The optimizer settings of a parameter group that come from the config (optim.*), besides the
# learning rate, which the schedule sets.
CONFIGURED = ("weight_decay", "betas", "eps")

# The per-step exchange between ranks, one all-reduce (sum) of these, in this order.
EXCHANGE = ("loss", "nonfinite", "stop", "data_error")


@dataclass(frozen=True)
class StepOutcome:
    """What the loop needs on the host after a step, read in one transfer."""

    mean_loss: float  # the mean over ranks of each rank's mean micro-batch loss
    skipped: bool  # the update was skipped on every rank (a non-finite loss or gradient somewhere)
    stop: bool  # some rank was asked to stop (signal, stop file)
    data_error: bool  # some rank could not fetch its data; nothing was updated


@dataclass
class StepResult:
    """One optimizer step, as device tensors: nothing here has been read on the host."""

    loss: torch.Tensor  # () float64: this rank's mean loss over its micro-batches
    agreed: torch.Tensor  # (len(EXCHANGE),) float64: EXCHANGE summed over the ranks
    # ZeRO-0: () the global norm before clipping; ZeRO-1..3: None (DeepSpeed's global_grad_norm is read instead)
    grad_norm: torch.Tensor | None
    lr: float  # the learning rate this update used
    world_size: int

    def read(self) -> StepOutcome:
        """The step's one host transfer."""
        loss_sum, nonfinite, stop, data_error = self.agreed.tolist()
        return StepOutcome(loss_sum / self.world_size, nonfinite > 0, stop > 0, data_error > 0)


class TrainEngine:
    """The DeepSpeed engine behind one call per optimizer step.

    `train_batch` runs forward and backward over the micro-batches and the
    optimizer step, and returns device tensors: losses are summed on the
    device, finiteness is decided there (GuardedAdamW skips through the fused
    kernel's `found_inf`), and the one exchange between ranks per step (the
    mean loss, the non-finite verdict, stop requests, data errors) rides on a
    single all-reduce that the optimizer triggers before it updates anything.
    Nothing is read on the host inside a step.  ZeRO-stage details stay here."""

    def __init__(
        self,
        ds_engine,
        model: torch.nn.Module,
        optimizer: GuardedAdamW,
        zero_stage: int,
        rank: int,
        world_size: int,
        device: torch.device,
    ):
        self.ds_engine, self.model, self.optimizer = ds_engine, model, optimizer
        self.zero_stage, self.rank, self.world_size, self.device = zero_stage, rank, world_size, device
        self._local: torch.Tensor | None = None  # this rank's EXCHANGE values for the step under way
        self._agreed: torch.Tensor | None = None
        optimizer.agree = self._agree
        # This run's optimizer settings per parameter group (decay and no-decay), as
        # the config gives them: a loaded checkpoint brings its own, which must not win.
        self._configured = [{key: group[key] for key in CONFIGURED} for group in optimizer.param_groups]
        # This rank's failed writes during the save under way: the one list DeepSpeed's
        # held writes append to (faults.hold_write_errors), emptied by each save.
        self._write_errors: list[str] = []

    # -- one step -------------------------------------------------------------------------

    def train_batch(
        self, micro_batches: list[torch.Tensor], stop_requested: bool = False, data_failed: bool = False
    ) -> StepResult:
        """micro_batches: grad_accum tensors of (B, T + 1) token windows; inputs
        and targets are views of one host-to-device copy.  `data_failed`: this
        rank could not fetch its data and passes stand-ins, so that every rank
        still meets in the step's collectives; the update is skipped everywhere
        and the loop stops on the agreed data error."""
        engine = self.ds_engine
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        grad_norm, lr = None, float("nan")
        for windows in micro_batches:
            windows = windows.to(self.device, non_blocking=True).long()
            with record_function("megagpt.forward"):
                loss = engine(windows[:, :-1], windows[:, 1:])
            total = total + loss.detach().double()
            boundary = engine.is_gradient_accumulation_boundary()
            if boundary:
                mean = total / len(micro_batches)
                bad = ~torch.isfinite(total)
                self._local = torch.stack(
                    [mean, bad.double(), mean.new_tensor(float(stop_requested)), mean.new_tensor(float(data_failed))]
                )
                self._agreed = None
                self.optimizer.new_step(bad | data_failed)
            with record_function("megagpt.backward"):
                engine.backward(loss)
            if boundary:
                lr = float(engine.get_lr()[0])  # this update's: stepping moves the schedule on
                if self.zero_stage == 0:
                    grad_norm = _global_grad_norm(engine.module)  # gradients are all-reduced by now
            with record_function("megagpt.step"):
                engine.step()  # DeepSpeed steps the optimizer on the accumulation boundary only
        if self._agreed is None:
            # DeepSpeed did not call the optimizer (ZeRO skips a non-finite
            # global gradient norm by itself): agree here, as skipped.
            self._agree(torch.ones((), dtype=torch.bool, device=self.device))
        return StepResult(total / len(micro_batches), self._agreed, grad_norm, lr, self.world_size)

    def _agree(self, local_bad: torch.Tensor) -> torch.Tensor:
        """The step's exchange (called by the optimizer before it updates
        anything); returns whether any rank saw a non-finite value or failed
        to fetch its data, on the device."""
        local = self._local.clone()
        local[1] = torch.maximum(local[1], local_bad.to(local.device, torch.float64))
        self._agreed = collectives.sum_(local)
        return (self._agreed[1] > 0) | (self._agreed[3] > 0)

    # -- the engine's state in a checkpoint ------------------------------------------------

    def save(self, root: str, tag: str) -> Callable[[], list[str]] | None:
        """ZeRO shards (or the whole state, ZeRO-0), optimizer, schedule: `root/tag/`.
        With trainer.async_save the files are only copied to host memory here
        (staged_save.py); the function returned writes them (from any thread)
        and returns their paths.  None: written already.  Collective."""
        from megagpt.engine.staged_save import StagedCheckpointEngine  # imports DeepSpeed: not at megagpt's import

        self._write_errors.clear()
        faults.hold_write_errors(self.ds_engine, self._write_errors)
        self.ds_engine.save_checkpoint(root, tag=tag, save_latest=False)
        staged = self.ds_engine.checkpoint_engine
        return staged.write_pending if isinstance(staged, StagedCheckpointEngine) else None

    def take_write_error(self) -> str | None:
        """The first write that failed on this rank during the last save (its
        path and error), if any; the checkpointer agrees on it with the others."""
        errors = self._write_errors[:]
        self._write_errors.clear()
        return errors[0] if errors else None

    def load(self, path: str, saved_world_size: int) -> None:
        """Load the state `save` wrote into the checkpoint directory `path`, on
        `saved_world_size` ranks.  Collective; raises EngineStateError.

        ZeRO-0 state is whole and loads on any number of ranks; ZeRO-1..3
        shards written by another number of ranks go through their copy in
        DeepSpeed's universal format (converted once, by rank 0, beside the
        checkpoints: universal_copy)."""
        source, universal = path, False
        if self.zero_stage > 0 and saved_world_size != self.world_size:
            outcome = None
            if self.rank == 0:
                try:
                    outcome = (universal_copy(path, saved_world_size, self.world_size), None)
                except EngineStateError as e:
                    outcome = (None, str(e))
            source, error = collectives.broadcast_from_main(outcome)
            if error:
                raise EngineStateError(error)
            universal = True
        root, tag = os.path.split(source.rstrip("/"))
        engine = self.ds_engine
        with faults.universal_load(engine, universal):
            load_path, _ = engine.load_checkpoint(root, tag=tag)
        if load_path is None:
            raise EngineStateError(f"checkpoint {path}: DeepSpeed found no state to load")
        if universal and self.zero_stage == 3:
            faults.repair_stage3_universal_load(engine, source)
        self._follow_config()

    def _follow_config(self) -> None:
        """After a load: the config this run was started with applies from its
        first step.  A checkpoint restores the optimizer's parameter groups with
        the hyperparameters and the learning rate they had when it was saved,
        and the schedule's position (DeepSpeed's WarmupCosineLR keeps only its
        iteration; its shape, trainer.max_steps, optim.warmup_steps, optim.lr and
        optim.min_lr_ratio, is this run's ds_config).  Without this the first
        step after a resume ran at the old schedule's learning rate, and with
        the old weight decay and betas for good.  Unchanged settings give the
        same values, bit for bit."""
        for group, configured in zip(self.optimizer.param_groups, self._configured):
            group.update(configured)
        scheduler = self.ds_engine.lr_scheduler
        scheduler.step(scheduler.last_batch_iteration)  # the next step's rate, by this run's schedule

    # -- evaluation -----------------------------------------------------------------------

    @torch.no_grad()
    def eval_losses(self, batches: list[torch.Tensor]) -> torch.Tensor:
        """(len(batches),) fp32 mean losses of (B, T + 1) windows, in eval mode."""
        self.ds_engine.eval()
        try:
            losses = []
            for batch in batches:
                batch = batch.to(self.device)
                losses.append(self.ds_engine(batch[:, :-1], batch[:, 1:]).float())
            return torch.stack(losses)
        finally:
            self.ds_engine.train()

    # -- what is logged -------------------------------------------------------------------

    def logged_grad_norm(self, result: StepResult) -> float:
        """For the log only (a host read): the global gradient norm of that step."""
        if self.zero_stage == 0:
            return float(result.grad_norm) if result.grad_norm is not None else float("nan")
        norm = self.ds_engine.get_global_grad_norm()  # DeepSpeed keeps it on the host already
        return float(norm) if norm is not None else float("nan")


def _global_grad_norm(module: torch.nn.Module) -> torch.Tensor | None:
    """Without ZeRO every rank holds the whole, all-reduced gradient, so the
    local norm is the global one (ZeRO computes its own).  On the device."""
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
