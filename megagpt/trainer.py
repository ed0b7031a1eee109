"""The training loop: data -> engine step -> metrics -> checkpoint."""

from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megagpt import checkpoint
from megagpt.config import Config, global_batch, grad_accum
from megagpt.data.stream import Batches
from megagpt.flops import flops_per_token
from megagpt.metrics import MetricsSink, console, progress_line

log = logging.getLogger("megagpt")


@dataclass
class TrainState:
    """Counters that survive a restart (with the data position and RNG)."""
    step: int = 0
    tokens_seen: int = 0
    wandb_id: str | None = None
    extra: dict = field(default_factory=dict)


def _mean_across_ranks(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def _grad_norm(engine) -> float:
    """After the optimizer step. ZeRO computes it; stage 0 in fp32 does not."""
    gn = engine.get_global_grad_norm()
    if gn is None:
        return float("nan")
    return float(gn)


class Trainer:
    def __init__(self, cfg: Config, env, device: torch.device, engine, batches: Batches,
                 state: TrainState, sink: MetricsSink | None, run_dir: str, n_params: int,
                 peak_flops: float, gcfg):
        self.cfg, self.env, self.device, self.engine = cfg, env, device, engine
        self.batches, self.state, self.sink, self.run_dir = batches, state, sink, run_dir
        self.accum = grad_accum(cfg.trainer, env.world_size)
        self.global_batch = global_batch(cfg.trainer, env.world_size)
        self.tokens_per_step = self.global_batch * cfg.data.seq_len
        self.flops_per_token = flops_per_token(n_params, gcfg.n_layer, gcfg.n_head, gcfg.head_dim,
                                               cfg.data.seq_len)
        self.peak_flops = peak_flops
        self.ckpt_root = os.path.join(run_dir, "checkpoints")

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over grad_accum micro-batches. Returns (loss, data_wait)."""
        engine, total = self.engine, 0.0
        wait0 = self.batches.wait_time
        for _ in range(self.accum):
            x, y = self.batches.next()  # (B, T) each
            loss = engine(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer on the accumulation boundary only
            total += loss.detach().float().item()
        return total / self.accum, self.batches.wait_time - wait0

    def run(self) -> TrainState:
        cfg, t, st = self.cfg, self.cfg.trainer, self.state
        window_t0, window_steps, window_wait = time.perf_counter(), 0, 0.0
        loss_acc, started = 0.0, time.perf_counter()
        first_step = st.step
        if self.env.is_main:
            console(f"training steps {st.step + 1}..{t.max_steps}: global batch {self.global_batch} x "
                    f"{cfg.data.seq_len} tokens, {self.accum} accumulation step(s), {self.env.world_size} rank(s)")
        while st.step < t.max_steps:
            loss, wait = self.train_step()
            st.step += 1
            st.tokens_seen += self.tokens_per_step
            window_steps += 1
            window_wait += wait
            loss_acc += loss
            if st.step % t.log_every == 0 or st.step == t.max_steps:
                now = time.perf_counter()
                elapsed = now - window_t0
                mean_loss, mean_wait = _mean_across_ranks([loss_acc / window_steps, window_wait], self.device)
                tps = window_steps * self.tokens_per_step / elapsed
                step_time = elapsed / window_steps
                record = {
                    "step": st.step,
                    "loss": mean_loss,
                    "lr": float(self.engine.get_lr()[0]),
                    "grad_norm": _grad_norm(self.engine),
                    "tokens_per_sec": tps,
                    "tokens_seen": st.tokens_seen,
                    "mfu": self.flops_per_token * tps / (self.peak_flops * self.env.world_size),
                    "step_time": step_time,
                    "data_wait": mean_wait / window_steps,
                    "memory_gb": _memory_gb(self.device),
                    "eta_sec": (t.max_steps - st.step) * (now - started) / (st.step - first_step),
                }
                if self.sink is not None:
                    self.sink.log(record)
                    console(progress_line(record, t.max_steps))
                window_t0, window_steps, window_wait, loss_acc = time.perf_counter(), 0, 0.0, 0.0
            if st.step % t.save_every == 0 or st.step == t.max_steps:
                self.save()
        return st

    def save(self) -> str:
        st = self.state
        from omegaconf import OmegaConf

        payload = {
            "version": 1,
            "step": st.step,
            "tokens_seen": st.tokens_seen,
            "data": self.batches.state_dict(),
            "wandb_id": st.wandb_id,
            "world_size": self.env.world_size,
            "config": OmegaConf.to_container(OmegaConf.structured(self.cfg)),
            **st.extra,
        }
        path = checkpoint.save(self.engine, self.ckpt_root, st.step, payload, self.env.rank, self.device)
        if self.env.is_main:
            console(f"saved checkpoint {path}")
        return path
