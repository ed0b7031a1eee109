"""AdamW that skips a non-finite update on every rank, decided on the device.

torch's fused AdamW kernels (CUDA, and CPU since torch 2.4) take a `found_inf`
tensor and leave parameters, moments and step counts untouched where it is
non-zero: the decision never has to reach the host.  Before the first
parameter group is updated, each rank's verdict (its loss, from the engine;
its gradients, checked here) is agreed with the other ranks through the
`agree` callback the engine installs: a single all-reduce per step, which the
engine also uses for its own per-step exchange (see train_engine.TrainEngine).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from megagpt.model.gpt import decay_groups


def use_fused_adamw(setting: bool | None, device_type: str) -> bool:
    """torch has fused AdamW kernels for CUDA and (since 2.4) CPU; auto uses them there."""
    if setting is not None:
        return setting
    return device_type in ("cuda", "cpu")


class GuardedAdamW(torch.optim.AdamW):
    """torch's AdamW that skips the update on every rank when any rank saw a
    non-finite loss or holds a non-finite gradient.

    `agree(local_bad) -> any_bad` (device tensors, installed by the engine)
    combines this rank's verdict with the other ranks'.  Under ZeRO the
    optimizer is stepped once per parameter sub-group: the first call of a
    step decides for all of them (`new_step()` resets).  Without the fused
    kernel (optim.fused=false) the decision is read on the host."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.agree: Callable[[torch.Tensor], torch.Tensor] = lambda bad: bad
        self.loss_bad: torch.Tensor | None = None  # this rank's loss was non-finite (set per step)
        self.skipped: torch.Tensor | None = None  # the agreed verdict of this step, on the device
        self._host_skip = False

    def new_step(self, loss_bad: torch.Tensor) -> None:
        self.loss_bad, self.skipped, self._host_skip = loss_bad, None, False

    @property
    def decided(self) -> bool:
        return self.skipped is not None

    @torch.no_grad()
    def step(self, closure=None):
        if self.skipped is None:
            self.skipped = self.agree(self._local_bad())
            if self.defaults["fused"]:
                self.found_inf = self.skipped.float()  # read by the fused kernel, on the device
            else:
                self._host_skip = bool(self.skipped.item())  # the unfused kernels cannot skip on the device
        if self._host_skip:
            return None
        return super().step(closure)

    def _local_bad(self) -> torch.Tensor:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        bad = self.loss_bad if self.loss_bad is not None else torch.zeros((), dtype=torch.bool)
        if grads:
            finite = torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
            bad = bad.to(finite.device) | ~finite
        return bad


def build_optimizer(optim_cfg, model: nn.Module, device_type: str) -> GuardedAdamW:
    """torch.optim.AdamW with decay / no-decay groups; DeepSpeed wraps it
    (ZeRO partitions its state) and drives the learning-rate schedule."""
    o = optim_cfg
    return GuardedAdamW(
        decay_groups(model, o.weight_decay),
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        fused=use_fused_adamw(o.fused, device_type),
    )
