"""The training loop: data -> engine step -> metrics -> validation -> checkpoint."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import resource
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.profiler import record_function

from megagpt import checkpoint
from megagpt.config import Config, global_batch, grad_accum
from megagpt.data.shards import DataError
from megagpt.data.source import TrainingData
from megagpt.data.stream import Batches, make_reader, val_sequences
from megagpt.flops import flops_per_token
from megagpt.metrics import MetricsSink, console, progress_line
from megagpt.profiling import StepProfiler
from megagpt.resilience import Faults, SpikeDetector, StopRequest, Watchdog
from megagpt.runtime import first_error, union_across_ranks

log = logging.getLogger("megagpt")


class TrainingDiverged(RuntimeError):
    """Non-finite losses the policy (trainer.on_nan) cannot get past."""


@dataclass
class TrainState:
    """Counters that survive a restart (with the data position and RNG)."""
    step: int = 0
    tokens_seen: int = 0
    wandb_id: str | None = None
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient
    rollbacks: int = 0
    loss_spikes: int = 0
    skipped_sequences: int = 0  # global sequences passed over by rollbacks


def _sum_across_ranks(values, device: torch.device) -> np.ndarray:
    t = torch.tensor(np.asarray(values, dtype=np.float64), device=device)
    dist.all_reduce(t)
    return t.cpu().numpy()


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def _local_grad_norm(module: torch.nn.Module) -> float:
    """Global grad norm without ZeRO (which computes its own): every rank holds
    the whole, all-reduced gradient, so the local norm is the global one."""
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0


def _read_tokenizer(data: TrainingData) -> bytes | None:
    """The data's tokenizer.json, kept in every checkpoint so export and
    generation need nothing but the checkpoint."""
    from megagpt.data.shards import read_bytes

    try:
        return read_bytes(data.tokenizer_url)
    except Exception as e:  # noqa: BLE001 - a missing tokenizer must not stop training
        log.warning("cannot read the tokenizer %s (%s); checkpoints will not include it", data.tokenizer_url, e)
        return None


class Trainer:
    def __init__(self, cfg: Config, env, device: torch.device, engine, data: TrainingData, batches: Batches,
                 state: TrainState, sink: MetricsSink | None, run_dir: str, n_params: int,
                 peak_flops: float, gcfg, optimizer=None):
        self.cfg, self.env, self.device, self.engine = cfg, env, device, engine
        self.optimizer = optimizer  # engine.GuardedAdamW: skips non-finite updates
        self.data, self.batches, self.state, self.sink = data, batches, state, sink
        self.accum = grad_accum(cfg.trainer, env.world_size)
        self.global_batch = global_batch(cfg.trainer, env.world_size)
        self.tokens_per_step = self.global_batch * cfg.data.seq_len
        self.flops_per_token = flops_per_token(n_params, gcfg.n_layer, gcfg.n_head, gcfg.head_dim,
                                               cfg.data.seq_len)
        self.peak_flops = peak_flops
        self.gcfg = gcfg
        self.tokenizer = _read_tokenizer(data) if env.is_main else None
        self.ckpt_root = os.path.join(run_dir, "checkpoints")
        t = cfg.trainer
        self.checkpointer = checkpoint.Checkpointer(self.ckpt_root, env.rank, env.world_size, device,
                                                    keep_last=t.keep_last, async_commit=t.async_save)
        self.stop = StopRequest(os.environ.get("MEGAGPT_STOP_FILE"))
        self.spikes = SpikeDetector(t.spike_factor, t.spike_window)
        self.faults = Faults(env.rank)
        self.watchdog: Watchdog | None = None
        self.profiler = StepProfiler(os.path.join(run_dir, "profile"), env.rank, t.profile_start, t.profile_steps)
        self.saved_step = -1
        self.stopped: str | None = None  # why the run stopped early, if it did
        self._consecutive_skips = 0
        self._val: dict[str, list[np.ndarray]] | None = None
        self._grad_norm = float("nan")
        self._lr = float("nan")  # the learning rate of the last update

    # -- one step -------------------------------------------------------------------------

    def fetch(self) -> list[torch.Tensor]:
        """This step's micro-batches, (B, T + 1) windows each. A data error on any
        rank stops every rank with the same message (agreed before any compute
        of the step)."""
        micro, error = [], None
        try:
            for _ in range(self.accum):
                micro.append(self.batches.next_windows())
        except DataError as e:
            error = f"rank {self.env.rank}: {e}"
        except Exception as e:  # noqa: BLE001 - a loader crash must not leave the other ranks waiting
            error = f"rank {self.env.rank}: data loader failed: {type(e).__name__}: {e}"
        error = first_error(error, self.device)
        if error:
            raise DataError(error)
        return micro

    def train_step(self) -> tuple[float, bool]:
        """One optimizer step over grad_accum micro-batches; returns (this
        rank's mean loss, whether the update was skipped for a non-finite
        loss or gradient on some rank)."""
        engine, total, loss_ok = self.engine, 0.0, True
        inject = self.faults.nan(self.state.step + 1, self.batches.consumed)
        spike = self.state.step + 1 in self.faults.spike_steps
        self.faults.maybe_hang(self.state.step + 1)
        with record_function("megagpt.data"):
            micro = self.fetch()
        for windows in micro:  # (B, T + 1) int32: one host-to-device copy, inputs and targets are views of it
            windows = windows.to(self.device, non_blocking=True).long()
            with record_function("megagpt.forward"):
                loss = engine(windows[:, :-1], windows[:, 1:])
            if inject:
                loss = loss * float("nan")
            if spike:
                loss = loss * 10.0
            value = loss.detach().float().item()
            loss_ok = loss_ok and math.isfinite(value)
            if engine.is_gradient_accumulation_boundary() and self.optimizer is not None:
                self.optimizer.new_step(loss_ok)  # decided with the other ranks inside the step
            with record_function("megagpt.backward"):
                engine.backward(loss)
            if engine.is_gradient_accumulation_boundary():
                self._lr = float(engine.get_lr()[0])  # this update's; stepping moves the schedule on
            if engine.is_gradient_accumulation_boundary() and self.cfg.deepspeed.zero_stage == 0:
                self._grad_norm = _local_grad_norm(engine.module)  # grads are all-reduced by now
            with record_function("megagpt.step"):
                engine.step()  # DeepSpeed steps the optimizer on the accumulation boundary only
            total += value
        skipped = bool(self.optimizer is not None and self.optimizer.skipped)
        if self.cfg.deepspeed.zero_stage > 0:  # ZeRO skips a non-finite global gradient norm by itself
            norm = engine.get_global_grad_norm()
            skipped = skipped or (norm is not None and not math.isfinite(float(norm)))
        return total / self.accum, skipped

    # -- validation -----------------------------------------------------------------------

    def evaluate(self) -> dict:
        """Mean loss on a fixed set of held-out sequences per source: the same
        eval_batches micro-batches on every rank at every evaluation."""
        t, mb = self.cfg.trainer, self.cfg.trainer.micro_batch_size
        if self._val is None:
            self._val = {name: val_sequences(ds, self.cfg.data.seq_len, self.env.rank, self.env.world_size,
                                             t.eval_batches * mb, reader=make_reader(self.cfg.data.verify))
                         for name, ds in self.data.val}
        local = []  # this rank's mean loss per source
        self.engine.eval()
        with torch.no_grad():
            for seqs in self._val.values():
                losses = []
                for i in range(t.eval_batches):
                    batch = torch.from_numpy(np.stack(seqs[i * mb : (i + 1) * mb])).to(self.device)
                    losses.append(self.engine(batch[:, :-1], batch[:, 1:]).float().item())
                local.append(np.mean(losses))
        self.engine.train()
        means = _sum_across_ranks(local, self.device) / self.env.world_size if local else []
        out = {name: float(m) for name, m in zip(self._val, means)}
        record = {"val_loss": float(np.mean(list(out.values())))} if out else {}
        if len(out) > 1:
            record.update({f"val_loss/{k}": v for k, v in out.items()})
        return record

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> TrainState:
        cfg, t, st = self.cfg, self.cfg.trainer, self.state
        window_t0, window_steps, loss_acc = time.perf_counter(), 0, 0.0
        wait0, started, first_step = self.batches.wait_time, time.perf_counter(), st.step
        blocked0 = 0.0
        if t.eval_every and not self.data.val and self.env.is_main:
            log.warning("trainer.eval_every=%d but the data has no validation shards; no val_loss",
                        t.eval_every)
        if self.env.is_main:
            console(f"training steps {st.step + 1}..{t.max_steps}: global batch {self.global_batch} x "
                    f"{cfg.data.seq_len} tokens, {self.accum} accumulation step(s), {self.env.world_size} rank(s)")
        self.watchdog = Watchdog(t.watchdog_seconds, self.env.rank)
        try:
            while st.step < t.max_steps:
                self.profiler.before_step(st.step + 1)
                loss, skipped = self.train_step()
                st.step += 1
                self.profiler.after_step(st.step)
                st.tokens_seen += self.tokens_per_step
                # One all-reduce per step: the mean loss, and whether any rank was asked to stop.
                total_loss, stop_votes = _sum_across_ranks([loss, 1.0 if self.stop.local() else 0.0], self.device)
                mean_loss = float(total_loss / self.env.world_size)
                if skipped:
                    if self._on_nonfinite(mean_loss):
                        window_t0, window_steps, loss_acc = time.perf_counter(), 0, 0.0
                        wait0, started, first_step = self.batches.wait_time, time.perf_counter(), st.step
                        continue
                else:
                    self._consecutive_skips = 0
                    loss_acc += loss
                    window_steps += 1
                    if self.spikes.observe(mean_loss):
                        st.loss_spikes += 1
                        if self.env.is_main:
                            log.warning("step %d: loss spike: %.4f is above %.2f x the mean of the last %d steps",
                                        st.step, mean_loss, t.spike_factor, t.spike_window)
                self.watchdog.beat()
                record = {}
                if (st.step % t.log_every == 0 or st.step == t.max_steps) and window_steps:
                    now = time.perf_counter()
                    record = self._record(loss_acc, window_steps, now - window_t0,
                                          self.batches.wait_time - wait0,
                                          (t.max_steps - st.step) * (now - started) / max(1, st.step - first_step))
                    record["save_blocked_sec"] = self.checkpointer.blocked - blocked0
                    blocked0 = self.checkpointer.blocked
                    window_t0, window_steps, loss_acc, wait0 = time.perf_counter(), 0, 0.0, self.batches.wait_time
                if t.eval_every and self.data.val and (st.step % t.eval_every == 0 or st.step == t.max_steps):
                    record = {"step": st.step, **record, **self.evaluate()}
                    self.watchdog.beat()
                if record and self.sink is not None:
                    self.sink.log(record)
                    console(progress_line(record, t.max_steps))
                if stop_votes > 0:
                    self._stop_and_requeue()
                    break
                if st.step % t.save_every == 0 or st.step == t.max_steps:
                    self.save()
                    self.watchdog.beat()
            self.checkpointer.wait()
        finally:
            self.watchdog.close()
            self.stop.restore()
        return st

    # -- faults ---------------------------------------------------------------------------

    def _on_nonfinite(self, mean_loss: float) -> bool:
        """A skipped update (every rank knows). Returns True after a rollback."""
        t, st = self.cfg.trainer, self.state
        st.skipped_steps += 1
        self._consecutive_skips += 1
        if self.env.is_main:
            log.warning("step %d: non-finite loss or gradient (mean loss %s); update skipped (%d in a row)",
                        st.step, mean_loss, self._consecutive_skips)
        if t.on_nan == "stop":
            raise TrainingDiverged(f"step {st.step}: non-finite loss or gradient (trainer.on_nan=stop)")
        if t.on_nan == "skip" and self._consecutive_skips <= t.max_nan_skips:
            return False
        if st.rollbacks >= t.max_rollbacks:
            raise TrainingDiverged(
                f"step {st.step}: non-finite loss or gradient persists after {st.rollbacks} rollback(s) "
                f"(trainer.max_rollbacks={t.max_rollbacks}); stopping")
        self.rollback()
        return True

    def rollback(self) -> None:
        """Back to the newest verified checkpoint; the data stream goes on
        from where it is, so the window that led here is not seen again."""
        from megagpt.runtime import broadcast_from_main

        st = self.state
        self.checkpointer.wait()
        path = checkpoint.resolve_resume("auto", self.ckpt_root) if self.env.is_main else None
        path = broadcast_from_main(path)
        if path is None:
            raise TrainingDiverged(f"step {st.step}: non-finite loss or gradient and no checkpoint to roll back to")
        saved = checkpoint.load(self.engine, path, self.env, self.device, self.cfg.trainer.seed,
                                self.cfg.deepspeed.zero_stage)
        skipped = self.batches.consumed - int(saved["data"]["consumed"])
        if self.env.is_main:
            console(f"rollback: step {st.step} -> step {saved['step']} ({path}); the data stream continues at "
                    f"sequence {self.batches.consumed}: sequences [{saved['data']['consumed']}, "
                    f"{self.batches.consumed}) are skipped")
        st.step, st.tokens_seen = int(saved["step"]), int(saved["tokens_seen"])
        st.rollbacks += 1
        st.skipped_sequences += skipped
        self._consecutive_skips = 0
        self.saved_step = st.step
        if self.sink is not None:
            self.sink.rewind(st.step)

    def _stop_and_requeue(self) -> None:
        """Every rank agreed to stop: save here, then requeue the SLURM job."""
        st, reason = self.state, self.stop.local() or "another rank"
        if self.saved_step != st.step:
            self.save()
        self.checkpointer.wait()
        self.stopped = reason
        if not self.env.is_main:
            return
        if self.stop.stop_file and os.path.exists(self.stop.stop_file):
            os.remove(self.stop.stop_file)  # honoured: the restarted run must not stop at once
        job = os.environ.get("SLURM_JOB_ID")
        requeued = ""
        request = os.environ.get("MEGAGPT_REQUEUE_FILE")
        if job and self.cfg.trainer.requeue and request:
            # slurm/pretrain.sh requeues once srun has ended (every rank exited cleanly).
            with open(request, "w") as f:
                f.write(f"{st.step}\n")
            requeued = f"; the batch script will requeue SLURM job {job}"
        elif job and self.cfg.trainer.requeue:
            import subprocess

            r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            requeued = (f"; requeued SLURM job {job}" if r.returncode == 0
                        else f"; `scontrol requeue {job}` failed: {(r.stderr or r.stdout).strip()}")
        console(f"megagpt: stop requested ({reason}); checkpoint saved at step {st.step}{requeued}")

    def _record(self, loss_acc: float, steps: int, elapsed: float, wait: float, eta: float) -> dict:
        mix = self.batches.mix
        sums = _sum_across_ranks([loss_acc / steps, wait, mix.skipped, *self.batches.source_counts], self.device)
        W = self.env.world_size
        tps = steps * self.tokens_per_step / elapsed
        record = {
            "step": self.state.step,
            "loss": float(sums[0] / W),
            "lr": self._lr,
            "grad_norm": self._grad_norm if self.cfg.deepspeed.zero_stage == 0
            else float(self.engine.get_global_grad_norm() or float("nan")),
            "tokens_per_sec": tps,
            "tokens_seen": self.state.tokens_seen,
            "mfu": self.flops_per_token * tps / (self.peak_flops * W),
            "step_time": elapsed / steps,
            "data_wait": float(sums[1] / W / steps),
            "data_skipped_shards": int(sums[2]),
            "memory_gb": _memory_gb(self.device),
            "eta_sec": eta,
            "skipped_steps": self.state.skipped_steps,
            "loss_spikes": self.state.loss_spikes,
            "rollbacks": self.state.rollbacks,
        }
        if len(mix.sources) > 1:  # realized proportions since this process started
            counts = sums[3:]
            record.update({f"mix/{n}": float(c / max(1, counts.sum())) for n, c in zip(mix.names, counts)})
        return record

    def save(self) -> str:
        from omegaconf import OmegaConf

        st = self.state
        data_state = self.batches.state_dict()
        data_state["bad_shards"] = union_across_ranks(data_state["bad_shards"])
        payload = {
            "version": 1,
            "step": st.step,
            "tokens_seen": st.tokens_seen,
            "data": data_state,
            "wandb_id": st.wandb_id,
            "world_size": self.env.world_size,
            "config": OmegaConf.to_container(OmegaConf.structured(self.cfg)),
            "model": dataclasses.asdict(self.gcfg),
            "counters": {k: getattr(st, k) for k in ("skipped_steps", "rollbacks", "loss_spikes",
                                                     "skipped_sequences")},
        }
        path = self.checkpointer.save(self.engine, st.step, payload, tokenizer=self.tokenizer)
        self.saved_step = st.step
        if self.env.is_main:
            console(f"saved checkpoint {path}" + (" (committing in the background)"
                                                  if self.cfg.trainer.async_save else ""))
        return path
