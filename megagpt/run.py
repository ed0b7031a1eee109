"""A training run wired together from its config: the process group, the
data, the model and its engine, the state that survives restarts, the hooks
(each placed by its phase: hooks.Phase), and the loop.

    run = build(cfg)        # every rank; locks run.dir, resumes from its newest checkpoint
    try:
        try:
            run.train()
        finally:
            run.close()
        run.finish()        # the closing line and the export, once every rank is done
    finally:
        run.release()       # run.dir's lock
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

import torch
from omegaconf import OmegaConf

from megagpt import checkpoint, collectives, hf_import, hooks, resume_check, run_lock, runtime
from megagpt.atomic import write_json
from megagpt.config import Config, ConfigError, global_batch, grad_accum
from megagpt.config_checks import flash_precision_problem, validate
from megagpt.data.loader import Batches
from megagpt.data.source import TrainingData, open_training_data
from megagpt.data.streams import make_reader
from megagpt.data.validation import val_sequences
from megagpt.engine import build_engine, build_model_config, deepspeed_config, resolve_precision
from megagpt.flops import flops_per_token, peak_flops
from megagpt.loop import Loop
from megagpt.metrics import console, new_wandb_id
from megagpt.model.attention import flash_trial, resolve_backend, resolve_sdpa_backend
from megagpt.model.config import GPTConfig, for_device
from megagpt.resilience import NanPolicy, StopRequest
from megagpt.state import RngState, Snapshot, TrainState

if TYPE_CHECKING:
    from megagpt.engine import TrainEngine

log = logging.getLogger("megagpt")

# build()'s extension point, for tests only: (this process's runtime.Env, the built TrainEngine) -> hooks added
# to the run's own, each placed by its phase (tests/fault_train.py injects faults with it).
ExtraHooks = Callable[[runtime.Env, "TrainEngine"], list[hooks.Hook]]


@dataclass
class Run:
    cfg: Config
    env: runtime.Env
    run_dir: str
    loop: Loop
    batches: Batches
    lock: run_lock.RunLock | None = None  # rank 0's hold on run_dir, released by close()

    def train(self) -> TrainState:
        return self.loop.run()

    def close(self) -> None:
        self.loop.close()
        self.batches.close()

    def release(self) -> None:
        """Give up run.dir's lock: last, after close() and finish()."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def finish(self) -> None:
        """After a run that was not stopped early: the closing line, then the
        export of the final checkpoint (complete once every rank is here)."""
        import torch.distributed as dist

        state = self.loop.state
        if self.loop.stopped is None and self.env.is_main:
            console(f"done: {state.step} steps, {state.tokens_seen:,} tokens; outputs in {self.run_dir}")
        dist.barrier()
        if self.loop.stopped is None and self.cfg.export.at_end and self.env.is_main:
            from megagpt.export import export

            out = export(
                os.path.join(self.run_dir, "checkpoints"),
                self.cfg.export.dir or os.path.join(self.run_dir, "hf"),
                self.cfg.export.max_shard_bytes,
            )
            console(f"exported to {out} (Hugging Face format)")
        dist.barrier()


def build(
    cfg: Config,
    point: int | None = None,
    chosen_model_keys: frozenset[str] = frozenset(),
    extra_hooks: ExtraHooks | None = None,
) -> Run:
    """The run of `cfg` (see `_build`).  It holds run.dir's lock (run_lock.py)
    from before anything there is written until Run.close(); a failure on the
    way releases it (a multirun's next point runs in this process).
    `extra_hooks`: for tests only (ExtraHooks); a production run has none."""
    held: list[run_lock.RunLock] = []
    try:
        return _build(cfg, point, chosen_model_keys, held, extra_hooks)
    except BaseException:
        for lock in held:
            lock.release()
        raise


def _build(
    cfg: Config, point: int | None, chosen_model_keys: frozenset[str], held: list, extra_hooks: ExtraHooks | None
) -> Run:
    """`point`: this job's number in a Hydra multirun run in this process
    (the default run.dir then differs per point).  `chosen_model_keys`: the
    `model.*` keys the user set (a `model=` preset sets all of them), checked
    against the folder of model.init_from."""
    import torch.distributed as dist

    env = runtime.read_env()
    device = runtime.device_for(env)
    t = cfg.trainer
    # Checked before any heavy work, on every rank, and agreed: a rank that
    # stopped alone would be ended by the launcher before the others said why.
    # (The process group for that comes up with safe settings if the config's are the bad ones.)
    try:
        validate(cfg, env.world_size, cuda=device.type == "cuda")
        problem = None
    except ConfigError as e:
        problem = e
    ds = cfg.deepspeed
    runtime.init_distributed(
        env, ds.backend if problem is None else "auto", device, ds.timeout_minutes if problem is None else 30
    )
    _on_every_rank(lambda: _raise(problem))
    runtime.set_cpu_threads(env, t.cpu_threads)
    attention = resolve_backend(cfg.model.attention, device.type)
    run_dir = os.path.abspath(cfg.run.dir or runtime.default_run_dir(env, point=point))
    collectives.agree(run_dir, "run.dir")
    # One job per run.dir: rank 0 locks it before anything there is written or
    # deleted; if another job holds it, every rank stops with the same line.
    _on_every_rank(lambda: _take_run_dir(run_dir, cfg.run.lock_stale_seconds, held) if env.is_main else None)
    if cfg.export.at_end:  # where the export at the end goes, checked now rather than after training
        _on_every_rank(lambda: _check_export_dir(cfg.export.dir or os.path.join(run_dir, "hf")))
    if env.is_main:
        os.makedirs(run_dir, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(cfg), os.path.join(run_dir, "config.yaml"))
        console(f"run.dir: {run_dir}")

    # A model folder to start from is checked through (files, names, shapes) before any heavy work.
    folder = _on_every_rank(lambda: hf_import.open_folder(cfg.model.init_from)) if cfg.model.init_from else None
    data = open_training_data(cfg, env, barrier=dist.barrier)
    tokenizer = _read_tokenizer(data)
    if folder is None:
        model_cfg = build_model_config(cfg, data.vocab_size, attention, data.eod_id, device.type)
    else:

        def from_folder():
            hf_import.check_tokenizer(folder, data.vocab_size, tokenizer)
            # model.compile and model.loss_chunk_tokens, resolved for this device and the folder's vocabulary.
            auto = for_device(cfg.model, device.type, folder.config.vocab_size)
            settings = dataclasses.replace(cfg.model, compile=auto["compile"])
            c = hf_import.model_config(folder, settings, chosen_model_keys, cfg.data.seq_len, attention, data.eod_id)
            return dataclasses.replace(c, loss_chunk_tokens=auto["loss_chunk_tokens"])

        model_cfg = _on_every_rank(from_folder)
    precision = resolve_precision(cfg.deepspeed.precision, device.type)
    model_cfg = _try_flash(model_cfg, cfg.model.attention, device, precision, console if env.is_main else None)
    if env.is_main:

        def setting(v):
            return "null (auto)" if v is None else str(v).lower()

        chunk = model_cfg.loss_chunk_tokens
        console(
            f"compile: {'on' if model_cfg.compile else 'off'} (model.compile={setting(cfg.model.compile)}); "
            f"loss: {f'chunks of {chunk} tokens' if chunk else 'plain'} "
            f"(model.loss_chunk_tokens={setting(cfg.model.loss_chunk_tokens)})"
        )
    if attention == "sdpa":  # SDPA's kernel on CUDA: the faster of cuDNN and flash at this shape (auto)
        kernel = None
        if env.is_main:  # rank 0 measures; every rank must use the same kernel
            kernel = resolve_sdpa_backend(
                cfg.model.sdpa_backend,
                device.type,
                batch=t.micro_batch_size,
                n_head=model_cfg.n_head,
                n_kv_head=model_cfg.n_kv_head,
                seq_len=cfg.data.seq_len,
                head_dim=model_cfg.head_dim,
                doc_mask=model_cfg.doc_mask,
                log=console,
            )
        # The model's SDPA calls read it from their config (None: torch's choice, "auto" there).
        model_cfg = dataclasses.replace(model_cfg, sdpa_backend=collectives.broadcast_from_main(kernel) or "auto")
    # Rank 0 picks the checkpoint (verifying it, setting damaged ones aside); all ranks load it.
    ckpt_root = os.path.join(run_dir, "checkpoints")
    resume_from = collectives.broadcast_from_main(_resolve_resume(t.resume, ckpt_root) if env.is_main else None)
    if isinstance(resume_from, Exception):
        raise resume_from
    config_record = OmegaConf.to_container(OmegaConf.structured(cfg))
    if resume_from:  # what the checkpoint cannot resume with stops here, before anything is loaded
        resume_check.check(
            resume_from,
            checkpoint.load_state(resume_from),
            config_record,
            asdict(model_cfg),
            precision,
            data.mix.layout(),
            console if env.is_main else None,
        )
    # A restart resumes from the run's own checkpoint, never from the folder again.
    load = hf_import.module_loader(folder, model_cfg) if folder is not None and not resume_from else None
    engine = build_engine(
        cfg,
        model_cfg,
        deepspeed_config(cfg, env.world_size, device.type, model_cfg.n_embd),
        env.rank,
        env.world_size,
        device,
        load=load,
    )
    if env.is_main and load is not None:
        console(f"weights: {folder.folder} ({', '.join(folder.record['weights'])})")
    n_params = engine.model.num_params(matmul_only=True)  # N of flops.py
    if env.is_main:
        console(
            f"model: {n_params / 1e6:.2f}M parameters (in matmuls), {model_cfg.family}, "
            f"{model_cfg.n_layer} layers, {model_cfg.n_head} heads ({model_cfg.n_kv_head} key/value), "
            f"width {model_cfg.n_embd}, vocab {model_cfg.vocab_size}; ZeRO stage {cfg.deepspeed.zero_stage}, "
            f"{precision}"
        )

    accum, batch = grad_accum(t, env.world_size), global_batch(t, env.world_size)
    batches = Batches(
        data.mix, env.rank, env.world_size, t.micro_batch_size, prefetch=cfg.data.prefetch, sequences_per_step=batch
    )
    state, rng, stop = TrainState(), RngState(device), StopRequest(os.environ.get("MEGAGPT_STOP_FILE"))
    # The run as the checkpoints and W&B describe it: the resolved config, and where the weights came from.
    description = {"config": config_record, "init_from": folder.record if folder is not None else None}
    hook_list = _hooks(
        cfg,
        env,
        device,
        run_dir,
        engine,
        data,
        batch * cfg.data.seq_len,
        stop,
        flops_per_token(n_params, model_cfg.n_layer, model_cfg.n_head, model_cfg.head_dim, cfg.data.seq_len),
        description,
    )
    hook_list += extra_hooks(env, engine) if extra_hooks is not None else []
    snapshot = Snapshot(
        state,
        batches,
        {h.name: h for h in hook_list if h.name},
        {"world_size": env.world_size, **description, "model": asdict(model_cfg), "precision": precision},
    )
    restore_args = {"env": env, "seed": t.seed}
    if resume_from:
        checkpoint.restore(resume_from, engine=engine, rng=rng, snapshot=snapshot, **restore_args)
        if env.is_main:
            console(f"resumed from {resume_from} at step {state.step}")
    state.wandb_id = _wandb_id(run_dir, state.wandb_id, cfg, env)
    checkpointer = checkpoint.Checkpointer(
        ckpt_root,
        env.rank,
        env.world_size,
        keep_last=t.keep_last,
        async_commit=t.async_save,
        tokenizer=tokenizer if env.is_main else None,
        files=_source_files(folder) if env.is_main and folder is not None else None,
    )
    if env.is_main:
        console(
            f"training steps {state.step + 1}..{t.max_steps}: global batch {batch} x {cfg.data.seq_len} tokens, "
            f"{accum} accumulation step(s), {env.world_size} rank(s)"
        )
    loop = Loop(
        engine=engine,
        batches=batches,
        state=state,
        snapshot=snapshot,
        rng=rng,
        checkpointer=checkpointer,
        hooks=hook_list,
        nan_policy=NanPolicy(t.on_nan, t.max_nan_skips, t.max_rollbacks, env.is_main),
        stop=stop,
        max_steps=t.max_steps,
        grad_accum=accum,
        tokens_per_step=batch * cfg.data.seq_len,
        restore_args=restore_args,
        is_main=env.is_main,
    )
    return Run(cfg, env, run_dir, loop, batches, lock=held[0] if held else None)


def _hooks(
    cfg: Config,
    env,
    device: torch.device,
    run_dir: str,
    engine,
    data: TrainingData,
    tokens_per_step: int,
    stop: StopRequest,
    flops: float,
    description: dict,
) -> list[hooks.Hook]:
    """The run's hooks.  The loop orders them by the phase each declares
    (hooks.Phase: count, measure, report, then stop or save, then tell the
    watchdog the step is done); within a phase, as listed here."""
    t = cfg.trainer
    val_count = t.eval_batches * t.micro_batch_size

    def val_sets() -> dict:
        return {
            name: val_sequences(
                ds, cfg.data.seq_len, env.rank, env.world_size, val_count, reader=make_reader(cfg.data.verify)
            )
            for name, ds in data.val
        }

    if t.eval_every and not data.val and env.is_main:
        log.warning("trainer.eval_every=%d but the data has no validation shards; no val_loss", t.eval_every)
    config = {**description["config"], "init_from": description["init_from"]}  # W&B's run config
    return [
        hooks.Profile(run_dir, env.rank, t.profile_start, t.profile_steps),
        hooks.SpikeWatch(t.spike_factor, t.spike_window, env.is_main),
        hooks.Throughput(
            t.log_every, t.max_steps, tokens_per_step, flops, peak_flops(device, t.peak_flops), env.world_size, device
        ),
        hooks.Evaluation(
            t.eval_every if data.val else 0,
            t.max_steps,
            t.eval_batches,
            t.micro_batch_size,
            val_sets,
            env.world_size,
            device,
        ),
        *([hooks.CompileReport()] if env.is_main and engine.model.cfg.compile else []),
        hooks.MetricsWriter(run_dir, cfg.logger, config, t.max_steps, env.is_main),
        hooks.StopAndRequeue(stop, t.requeue, env.is_main),
        hooks.CheckpointPolicy(t.save_every, t.max_steps),
        hooks.WatchdogHook(t.watchdog_seconds, env.rank),
    ]


def _try_flash(model_cfg: GPTConfig, setting: str, device: torch.device, precision: str, log) -> GPTConfig:
    """The model's config once FlashAttention, where chosen, has passed a trial
    call at the model's head shape and the run's precision on every rank
    (attention.flash_trial).  If it cannot train this run on some rank: `auto`
    falls back to SDPA on all of them and says why; an explicit
    model.attention=flash_attn stops the run, on every rank, with the reason."""
    failure = None
    if model_cfg.attention == "flash_attn":
        problem = flash_precision_problem(precision)
        if problem is not None:
            failure = f"it {problem}"
        else:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            trial = flash_trial(
                model_cfg.n_head, model_cfg.n_kv_head, model_cfg.head_dim, model_cfg.doc_mask, device, dtype
            )
            failure = collectives.first_message(trial and f"its trial call at this model's head shape failed: {trial}")
        if failure is not None and setting != "auto":
            raise ConfigError(f"model.attention=flash_attn: FlashAttention cannot train this run: {failure}")
        if failure is not None:
            model_cfg = dataclasses.replace(model_cfg, attention="sdpa")
    if log is not None:
        why = f"; FlashAttention not used: {failure}" if failure else ""
        log(f"attention: {model_cfg.attention} (model.attention={setting}{why})")
    return model_cfg


def _take_run_dir(run_dir: str, stale_seconds: float, held: list) -> None:
    """Lock run_dir for this job (into `held`); a job holding it stops this one (ConfigError: exit code 2),
    as does a run.dir this process cannot write."""
    _check_writable(run_dir)
    try:
        held.append(run_lock.acquire(run_dir, stale_seconds, say=console))
    except run_lock.LockError as e:
        raise ConfigError(str(e)) from None


def _check_export_dir(out: str) -> None:
    from megagpt.export import check_out

    try:
        check_out(out)
    except checkpoint.CheckpointError as e:
        raise ConfigError(f"export.dir: {e}") from None


def _check_writable(run_dir: str) -> None:
    """run.dir and its checkpoints folder take a file, checked at start: otherwise the
    first save, minutes or hours in, fails (a read-only mount, another user's folder)."""
    import tempfile

    for folder in (run_dir, os.path.join(run_dir, "checkpoints")):
        if folder != run_dir and not os.path.isdir(folder):
            continue
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".megagpt-write-check-"):
                pass
        except OSError as e:
            raise ConfigError(
                f"run.dir: {folder} is not writable ({e.strerror or e}); the run writes its "
                "checkpoints and metrics there: choose a writable run.dir"
            ) from None


def _raise(problem: Exception | None) -> None:
    if problem is not None:
        raise problem


def _on_every_rank(check):
    """`check()`'s value; if it fails on any rank, every rank raises with the
    first failing rank's message.  A rank failing alone would exit at once,
    and the launcher would end the others before they could say why."""
    try:
        value, error = check(), None
    except ConfigError as e:
        value, error = None, e
    message = collectives.first_message(str(error) if error is not None else None)
    if message is not None:
        raise error if error is not None else ConfigError(message)
    return value


def _resolve_resume(resume: str, root: str):
    try:
        return checkpoint.resolve_resume(resume, root)
    except checkpoint.CheckpointError as e:  # raised on every rank after the broadcast
        return e


def _read_tokenizer(data: TrainingData) -> bytes | None:
    """The data's tokenizer.json, kept in every checkpoint so export and
    generation need nothing but the checkpoint."""
    from megagpt.data.remote import read_bytes

    try:
        return read_bytes(data.tokenizer_url)
    except Exception as e:  # noqa: BLE001 - a missing tokenizer must not stop training
        log.warning("cannot read the tokenizer %s (%s); checkpoints will not include it", data.tokenizer_url, e)
        return None


def _source_files(folder) -> dict[str, bytes]:
    """The tokenizer and config files of the folder the run started from, as
    each checkpoint carries them (export writes them back: the folder may be gone by then)."""
    from megagpt.hf.tokenizer_files import SOURCE_DIR, read_source_files

    return {f"{SOURCE_DIR}/{name}": data for name, data in read_source_files(folder.folder).items()}


def _wandb_id(run_dir: str, from_checkpoint: str | None, cfg: Config, env) -> str | None:
    """The W&B run id is kept with the run (run.json), so a restart continues it."""
    if cfg.logger.kind != "wandb":
        return from_checkpoint
    path = os.path.join(run_dir, "run.json")
    run_id = from_checkpoint
    if env.is_main:
        if run_id is None and os.path.exists(path):
            with open(path) as f:
                run_id = json.load(f).get("wandb_id")
        run_id = run_id or new_wandb_id()
        write_json(path, {"wandb_id": run_id}, indent=None)
    return run_id
