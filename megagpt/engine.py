"""The one place where the plain model meets DeepSpeed.

`build_engine` constructs the model inside `deepspeed.zero.Init` (ZeRO-3: each
parameter is partitioned as soon as its module is built, so no rank ever holds
the whole model), initialises the weights module by module, and wraps it in a
DeepSpeed engine with megagpt's AdamW (optimizer.py) and the warmup + cosine
schedule (ds_config.py), optionally compiled with torch.compile.

`TrainEngine` is what the loop trains through: one `train_batch` call per
optimizer step, returning device tensors, and the checkpoint I/O of the
DeepSpeed state.  ZeRO-stage details, and DeepSpeed's faults, stay here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from megagpt import collectives
from megagpt.atomic import write_failure
from megagpt.config import Config
from megagpt.model.gpt import GPT, GPTConfig
from megagpt.optimizer import GuardedAdamW, build_optimizer

log = logging.getLogger("megagpt")


def build_model_config(cfg: Config, vocab_size: int, attention: str, eod_id: int | None = None,
                       device_type: str = "cpu") -> GPTConfig:
    """The model's config: the `model.*` settings, with the tokenizer's vocab size, data.seq_len, the
    resolved attention backend and the end-of-document id, and model.compile and
    model.loss_chunk_tokens resolved for `device_type` (GPTConfig.from_settings)."""
    return GPTConfig.from_settings(cfg.model, vocab_size=vocab_size, seq_len=cfg.data.seq_len, attention=attention,
                                   eod_id=eod_id, device_type=device_type)


def build_engine(cfg: Config, model_cfg: GPTConfig, ds_config: dict, rank: int, world_size: int,
                 device: torch.device, load: Callable[[str, torch.nn.Module], None] | None = None) -> TrainEngine:
    """The model is built sharded under ZeRO-3.  `load`: where the weights
    come from (see init_weights); by default a random initialisation.
    Where model_cfg.compile (the resolved model.compile) says so, each block is
    compiled (GPT.compile_blocks; under ZeRO-3 the blocks are then leaves);
    DeepCompile (deepspeed.deepcompile) compiles the whole model through
    DeepSpeed's engine.compile()."""
    import deepspeed
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE

    stage3 = cfg.deepspeed.zero_stage == 3
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=stage3):
        model = GPT(model_cfg)
    _restore_torch_linear_unless(stage3 and cfg.deepspeed.stage3_memory_efficient_linear)
    if stage3 and cfg.deepspeed.stage3_module_granularity_threshold:
        from megagpt.config_checks import check_module_granularity

        check_module_granularity(cfg.deepspeed.stage3_module_granularity_threshold, model)
    init_weights(model, cfg.trainer.seed, rank, stage3, load)
    if stage3 and model_cfg.loss_chunk_tokens:
        # The chunked loss (model/loss.py) reads the head's weight as a tensor in the
        # model's own forward: the head module never runs, so its hooks do not gather
        # it (DeepSpeed's parameter getter would, in an eager forward, but not while
        # torch.compile traces).  An external parameter of the root module is gathered
        # for the model's whole forward and backward (tied, it is the embedding's too).
        deepspeed.zero.register_external_parameter(model, model.lm_head.weight)
    blocks_compiled = model_cfg.compile and not cfg.deepspeed.deepcompile
    if stage3 and leaf_blocks(cfg.deepspeed.stage3_leaf_blocks, blocks_compiled):
        # Each block is one ZeRO-3 leaf: its parameters gathered together, no hooks inside it.
        from deepspeed.utils import set_z3_leaf_modules

        from megagpt.model.gpt import Block

        set_z3_leaf_modules(model, [Block])
    if model_cfg.fp8 != "off":  # float8 training through torchao: the large Linear layers
        from megagpt.model import float8

        float8.check_fp8_supported(model_cfg.fp8, device)
        names = float8.convert(model, model_cfg.fp8, model_cfg.fp8_min_dim)
        if rank == 0:
            print(f"fp8: converted {len(names)} Linear layers to float8 ({model_cfg.fp8}, min dim "
                  f"{model_cfg.fp8_min_dim}); the output head stays in bf16", flush=True)
    if blocks_compiled:
        model.compile_blocks()  # compiled at the first forward
    optimizer = build_optimizer(cfg.optim, model, device.type)
    # Saved into every checkpoint, this marks it convertible to DeepSpeed's
    # universal format (resharding to another number of ranks): without it
    # ds_to_universal refuses ZeRO-1/2 checkpoints.  megagpt has no tensor or
    # pipeline parallelism, so there are no patterns to declare.
    model.universal_checkpoint_info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    # DeepSpeed's WarmupCosineLR starts at iteration -1, learning rate 0, and
    # the engine steps it after each optimizer step: step 1 would not learn at
    # all, and step k would run at the schedule's point k - 2.  One step here
    # puts step k at point k - 1: step 1 at lr / warmup_steps, the last step at
    # lr * min_lr_ratio.  (A resume loads the schedule's own state over this.)
    engine.lr_scheduler.step()
    if cfg.trainer.async_save:  # saves staged in host memory, written by the checkpointer's thread
        from megagpt.staged_save import StagedCheckpointEngine

        engine.checkpoint_engine = StagedCheckpointEngine(device, engine.checkpoint_serialization_enabled())
    if cfg.deepspeed.deepcompile:
        engine.compile()  # DeepSpeed's DeepCompile ("compile": {"deepcompile": true} in ds_config): the whole model
    return TrainEngine(engine, model, optimizer, cfg.deepspeed.zero_stage, world_size, device)


def _restore_torch_linear_unless(memory_efficient: bool) -> None:
    """deepspeed.zero.Init with memory_efficient_linear replaces F.linear for the
    whole process, and nothing puts it back: a later engine in the same process
    (a Hydra -m sweep) would keep it whatever its settings.  Put torch's back
    unless this engine asked for DeepSpeed's."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as zero_init

    original = getattr(zero_init, "linear_bk", None)  # saved by DeepSpeed when it patched
    if not memory_efficient and original is not None:
        torch.nn.functional.linear = original


def leaf_blocks(setting: bool | None, compiled: bool) -> bool:
    """deepspeed.stage3_leaf_blocks, resolved: None (auto) is on where the
    blocks are compiled, so that no ZeRO-3 hook runs inside a compiled block
    (each one would break its graph)."""
    return compiled if setting is None else setting


def init_weights(model: GPT, seed: int, rank: int, sharded: bool,
                 load: Callable[[str, torch.nn.Module], None] | None = None) -> None:
    """Fill the weights, one module at a time: `load(name, module)` fills the
    parameters a module owns directly (hf_import.module_loader: from a model
    folder); by default the model's random initialisation, the same for any
    world size and ZeRO stage (one generator walks the modules in order).
    Sharded (ZeRO-3), each module's parameters are gathered, rank 0 fills them
    and DeepSpeed re-partitions them (broadcasting rank 0's values): no rank
    holds more than one module's full weights."""
    if load is None:
        if not sharded:
            model.init_weights(seed)
            return
        generator = torch.Generator().manual_seed(seed)

        def load(name: str, module: torch.nn.Module) -> None:
            model.init_module_(module, generator)
    if not sharded:
        for name, module in model.named_modules():
            load(name, module)
        return
    import deepspeed

    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if rank == 0:
                load(name, module)
        _return_freed_memory()


def _return_freed_memory() -> None:
    """Hand the freed heap back to the OS.  Gathering one module after another
    allocates and frees large buffers; glibc raises its mmap threshold after
    such frees and then keeps them in the heap, so without this a rank's
    resident memory grew by about the whole model's size while building it
    (measured: 103 MB for a 110 MB model), though it held one module at a time."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
        except (OSError, AttributeError, TypeError):  # not glibc: nothing to trim
            _malloc_trim = lambda pad: 0  # noqa: E731
    _malloc_trim(0)


_malloc_trim = None


# -- the engine adapter ---------------------------------------------------------------------

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
    grad_norm: torch.Tensor | None  # ZeRO-0: () the global norm before clipping; ZeRO-1..3: DeepSpeed's (global_grad_norm)
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

    def __init__(self, ds_engine, model: torch.nn.Module, optimizer: GuardedAdamW, zero_stage: int,
                 world_size: int, device: torch.device):
        self.ds_engine, self.model, self.optimizer = ds_engine, model, optimizer
        self.zero_stage, self.world_size, self.device = zero_stage, world_size, device
        self._local: torch.Tensor | None = None  # this rank's EXCHANGE values for the step under way
        self._agreed: torch.Tensor | None = None
        optimizer.agree = self._agree
        # This run's optimizer settings per parameter group (decay and no-decay), as
        # the config gives them: a loaded checkpoint brings its own, which must not win.
        self._configured = [{key: group[key] for key in CONFIGURED} for group in optimizer.param_groups]
        self._write_errors: list[str] = []  # this rank's failed writes during the save under way

    # -- one step -------------------------------------------------------------------------

    def train_batch(self, micro_batches: list[torch.Tensor], stop_requested: bool = False,
                    data_failed: bool = False) -> StepResult:
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
                self._local = torch.stack([mean, bad.double(), mean.new_tensor(float(stop_requested)),
                                           mean.new_tensor(float(data_failed))])
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

    # -- checkpoint I/O of the DeepSpeed state --------------------------------------------

    def save(self, root: str, tag: str) -> Callable[[], list[str]] | None:
        """ZeRO shards (or the whole state, ZeRO-0), optimizer, schedule: `root/tag/`.
        With trainer.async_save the files are only copied to host memory here
        (staged_save.py); the function returned writes them (from any thread)
        and returns their paths.  None: written already."""
        from megagpt.staged_save import StagedCheckpointEngine  # imports DeepSpeed: not at megagpt's import

        self._write_errors = []
        self._hold_write_errors()
        self.ds_engine.save_checkpoint(root, tag=tag, save_latest=False)
        staged = self.ds_engine.checkpoint_engine
        return staged.write_pending if isinstance(staged, StagedCheckpointEngine) else None

    def take_write_error(self) -> str | None:
        """The first write that failed on this rank during the last save (its
        path and error), if any; the checkpointer agrees on it with the others."""
        errors, self._write_errors = self._write_errors, []
        return errors[0] if errors else None

    def _hold_write_errors(self) -> None:
        """DeepSpeed's save writes its files between collectives (a barrier, a
        check that every rank saves the same tag, a last barrier): a rank that
        raised out of it at a failed write (a full disk) would leave the others
        waiting there.  Its writes are made to record their error and write
        nothing more, so every rank leaves DeepSpeed's save together; the
        checkpointer then stops them all with the error (Checkpointer.save)."""
        engine = self.ds_engine
        if getattr(engine, "_megagpt_holds_write_errors", False):
            return

        def held(write):
            def call(*args, **kwargs):
                if self._write_errors:  # this save has failed: nothing more is written
                    return None
                try:
                    return write(*args, **kwargs)
                except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
                    path = next((a for a in args if isinstance(a, str)), "")
                    self._write_errors.append(write_failure(path, e))
                    return None
            return call

        engine.checkpoint_engine.save = held(engine.checkpoint_engine.save)
        engine._copy_recovery_script = held(engine._copy_recovery_script)  # zero_to_fp32.py, rank 0
        engine._megagpt_holds_write_errors = True

    def load(self, root: str, tag: str, universal: bool = False) -> bool:
        """Load `root/tag/`; `universal`: a copy in DeepSpeed's universal format
        (written by another number of ranks).  False if DeepSpeed found nothing."""
        engine = self.ds_engine
        engine._config.load_universal_checkpoint = universal  # read by DeepSpeed at load time only
        try:
            load_path, _ = engine.load_checkpoint(root, tag=tag)
        finally:
            engine._config.load_universal_checkpoint = False
        if load_path is None:
            return False
        if universal and self.zero_stage == 3:
            _repair_stage3_universal_load(engine, os.path.join(root, tag))
        self._follow_config()
        return True

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


def _repair_stage3_universal_load(engine, universal_dir: str) -> None:
    """Undo two faults of DeepSpeed 0.19.8's ZeRO-3 universal load
    (`DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3`),
    which made a resharded run drift from its first update on:

    - It stores one and the same `step` tensor in the state of every
      parameter group.  torch's AdamW increments each group's step in place,
      so with two groups the shared count went up twice per update and the
      second group's bias correction ran one step ahead, then two, ...
    - It copies the checkpoint's group-0 hyperparameters into every group,
      assuming they are all the same.  megagpt's groups differ in
      weight_decay (decay: optim.weight_decay; biases and norm gains: 0), so
      the no-decay group came back decaying.

    The converted checkpoint records every group (zero/optimizer_state.pt).
    ZeRO-1/2 universal loads read each group on its own and need neither."""
    inner = engine.optimizer.optimizer  # the wrapped torch AdamW
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()  # one count per group
    # DeepSpeed pickles its loss scaler into this file (weights_only cannot read
    # it); DeepSpeed's own loader has just read the same file the same way.
    saved = torch.load(os.path.join(universal_dir, "zero", "optimizer_state.pt"), map_location="cpu",
                       weights_only=False)["optimizer_state_dict"]["param_groups"]
    if len(saved) != len(inner.param_groups):
        raise RuntimeError(f"checkpoint {universal_dir}: {len(saved)} optimizer parameter groups, "
                              f"the model has {len(inner.param_groups)}")
    for group, saved_group in zip(inner.param_groups, saved):
        group.update({key: value for key, value in saved_group.items() if key != "params"})
