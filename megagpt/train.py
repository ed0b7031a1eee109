"""`torchrun -m megagpt.train [key=value ...]`: pretrain a GPT.

config -> data -> model -> engine -> resume -> loop -> checkpoint, logging at the edges.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from megagpt.config import Config, ConfigError, check_known_keys, register, unknown_key_error, validate

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
log = logging.getLogger("megagpt")


class UserError(Exception):
    """Bad config, data or checkpoint: reported as one line, exit code 2."""


def pretrain(cfg: Config, point: int | None = None) -> None:
    """One training job. `point`: its number in a Hydra multirun run in this
    process (the default run.dir then differs per point)."""
    import torch.distributed as dist

    from megagpt import checkpoint, runtime
    from megagpt.data.source import open_training_data
    from megagpt.engine import build_engine, build_model_config, deepspeed_config
    from megagpt.flops import peak_flops
    from megagpt.metrics import MetricsSink, console, new_wandb_id
    from megagpt.model.attention import resolve_backend
    from megagpt.trainer import TrainState, Trainer

    env = runtime.read_env()
    _setup_logging(env.is_main)
    validate(cfg, env.world_size)  # before any heavy work, on every rank
    run_dir = os.path.abspath(cfg.run.dir or runtime.default_run_dir(env, point=point))
    device = runtime.device_for(env)
    attention = resolve_backend(cfg.model.attention, device.type)
    runtime.set_cpu_threads(env, cfg.trainer.cpu_threads)
    runtime.init_distributed(env, cfg.deepspeed.backend, device, cfg.deepspeed.timeout_minutes)
    runtime.agree(run_dir, "run.dir")
    if env.is_main:
        os.makedirs(run_dir, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(cfg), os.path.join(run_dir, "config.yaml"))
        console(f"run.dir: {run_dir}")
        console(f"attention: {attention} (model.attention={cfg.model.attention})")

    data = open_training_data(cfg, env, barrier=dist.barrier)
    gcfg = build_model_config(cfg, data.vocab_size, attention, data.eod_id)
    ds_config = deepspeed_config(cfg, env.world_size, device.type)
    # Rank 0 picks the checkpoint (verifying it, setting damaged ones aside); all ranks load it.
    resume_from = runtime.broadcast_from_main(
        _resolve_resume(cfg.trainer.resume, os.path.join(run_dir, "checkpoints")) if env.is_main else None)
    if isinstance(resume_from, Exception):
        raise resume_from
    engine, model, optimizer = build_engine(cfg, gcfg, ds_config, env.rank, device.type)
    n_params = _count_params(model)
    if env.is_main:
        console(f"model: {n_params / 1e6:.2f}M parameters (in matmuls), "
                f"{gcfg.family}, {gcfg.n_layer} layers, {gcfg.n_head} heads ({gcfg.n_kv_head} key/value), "
                f"width {gcfg.n_embd}, vocab {gcfg.vocab_size}; "
                f"ZeRO stage {cfg.deepspeed.zero_stage}, {ds_config['bf16']['enabled'] and 'bf16' or 'fp32'}")

    state, consumed = TrainState(), 0
    if resume_from:
        saved = checkpoint.load(engine, resume_from, env, device, cfg.trainer.seed, cfg.deepspeed.zero_stage)
        from megagpt.data.stream import check_resumable

        consumed = check_resumable(saved["data"], data.mix)
        for source in data.mix.sources:  # shards found bad before the restart add no tokens
            source.bad.update(saved["data"].get("bad_shards", []))
        state = TrainState(step=saved["step"], tokens_seen=saved["tokens_seen"], wandb_id=saved.get("wandb_id"),
                           **saved.get("counters", {}))
        if env.is_main:
            console(f"resumed from {resume_from} at step {state.step}")
    state.wandb_id = _wandb_id(run_dir, state.wandb_id, cfg, env)

    from megagpt.data.stream import Batches

    batches = Batches(data.mix, env.rank, env.world_size, cfg.trainer.micro_batch_size,
                      consumed=consumed, prefetch=cfg.data.prefetch)
    sink = None
    if env.is_main:
        sink = MetricsSink(run_dir, cfg.logger, OmegaConf.to_container(OmegaConf.structured(cfg)),
                           state.wandb_id, state.step)
    peak = peak_flops(device, cfg.trainer.peak_flops)
    try:
        trainer = Trainer(cfg, env, device, engine, data, batches, state, sink, run_dir, n_params, peak, gcfg,
                          optimizer)
        trainer.run()
    except _user_errors() as e:
        # Said before the clean-up below: it can take seconds, and once one rank
        # has exited, the launcher terminates the others (SIGTERM) mid-way.
        _say(e)
        raise
    finally:
        batches.close()
        if sink is not None:
            sink.close()
    if trainer.stopped:
        dist.barrier()
        return
    if env.is_main:
        console(f"done: {state.step} steps, {state.tokens_seen:,} tokens; outputs in {run_dir}")
    dist.barrier()
    if cfg.export.at_end and env.is_main:  # the final checkpoint is complete: every rank passed the barrier
        from megagpt.export import export

        out = export(os.path.join(run_dir, "checkpoints"), cfg.export.dir or os.path.join(run_dir, "hf"),
                     cfg.export.max_shard_bytes)
        console(f"exported to {out} (Hugging Face format)")
    dist.barrier()


def _resolve_resume(resume: str, root: str):
    from megagpt.checkpoint import CheckpointError, resolve_resume

    try:
        return resolve_resume(resume, root)
    except CheckpointError as e:  # raised on every rank after the broadcast
        return e


def _count_params(model) -> int:
    """Parameters that take part in matmuls (N of flops.py): all but the
    position table, and the token table only when it doubles as the head."""
    # ZeRO-3 partitions parameters; ds_numel keeps the full size.
    seen, n = set(), 0
    skip = ("wpe.",) if model.cfg.tie_embeddings else ("wpe.", "wte.")
    for name, p in model.named_parameters():
        if id(p) in seen or name.startswith(skip):
            continue
        seen.add(id(p))
        n += getattr(p, "ds_numel", p.numel())
    return n


def _wandb_id(run_dir: str, from_ckpt: str | None, cfg: Config, env) -> str | None:
    """The W&B run id is kept with the run (run.json), so a restart continues it."""
    if cfg.logger.kind != "wandb":
        return from_ckpt
    from megagpt.runtime import agree

    path = os.path.join(run_dir, "run.json")
    run_id = from_ckpt
    if env.is_main:
        if run_id is None and os.path.exists(path):
            with open(path) as f:
                run_id = json.load(f).get("wandb_id")
        if run_id is None:
            from megagpt.metrics import new_wandb_id

            run_id = new_wandb_id()
        with open(path + ".tmp", "w") as f:
            json.dump({"wandb_id": run_id}, f)
        os.replace(path + ".tmp", path)
    return run_id


def _setup_logging(main: bool) -> None:
    logging.basicConfig(level=logging.INFO if main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # DeepSpeed reports its own set-up at INFO/WARNING; megagpt prints what matters.
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _user_errors() -> tuple[type[Exception], ...]:
    """What is reported as one line and exit code 2 (imported late: train's import stays light)."""
    from megagpt.checkpoint import CheckpointError
    from megagpt.data.shards import DataError
    from megagpt.trainer import TrainingDiverged

    return ConfigError, DataError, CheckpointError, UserError, TrainingDiverged


def _error_line(msg: str) -> None:
    # One write() of the whole line: the ranks share the launcher's stderr and
    # often fail at the same moment; print() writes the text and the newline
    # separately, so two ranks' lines could run into one.
    sys.stderr.write(f"megagpt: error (rank {os.environ.get('RANK', '0')}): {msg}\n")
    sys.stderr.flush()


def _fail(msg: str) -> None:
    _error_line(msg)
    sys.exit(2)


def _say(e: BaseException) -> None:
    """Print e's one-line report now, once (the exit comes later, in _hydra_main)."""
    if not getattr(e, "_megagpt_said", False):
        _error_line(str(e).splitlines()[0] if str(e) else type(e).__name__)
        e._megagpt_said = True


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def _hydra_main(dcfg: DictConfig) -> None:
    try:
        check_known_keys(dcfg)
        cfg = OmegaConf.to_object(dcfg)
        pretrain(cfg, _multirun_point())
    except _user_errors() as e:
        _say(e)
        sys.exit(2)
    except ValueError as e:
        if "Traceback" in str(e):
            raise
        _say(e)
        sys.exit(2)


def _multirun_point() -> int | None:
    """This job's number when Hydra's `-m` runs the points in this process."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return hc.job.num if hc.mode == RunMode.MULTIRUN else None


def precheck(argv: list[str]) -> None:
    """Compose the config once through Hydra's compose API so that an unknown
    key or a bad value becomes one line naming the key, not Hydra's
    multi-line report. Multirun and Hydra's own flags go straight to Hydra."""
    if any(a.startswith("-") for a in argv):
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            cfg = compose(config_name="config", overrides=argv)
            check_known_keys(cfg)
            OmegaConf.to_object(cfg)
    except ConfigError as e:
        _fail(str(e))
    except (HydraException, OmegaConfBaseException) as e:
        _fail(_one_line(e))


def _one_line(e: BaseException) -> str:
    cause = e.__cause__ or e.__context__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and getattr(cause, "full_key", None):
        # An unknown key: the same line as for one added with `+` (check_known_keys).
        return str(unknown_key_error(cause.full_key, getattr(cause, "object_type", None)))
    parts = [str(e).splitlines()[0].strip()]
    if getattr(e, "override", None):  # Hydra could not parse this override
        parts = [f"cannot parse override {e.override!r}: {parts[0]} "
                 "(quote values with special characters: key='value')"]
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause) and str(cause).splitlines()[0].strip() != str(e).splitlines()[0].strip():
        parts.append(str(cause).splitlines()[0].strip())
        key = getattr(cause, "full_key", None)
        if key and key not in " ".join(parts):
            parts.append(f"(key {key})")
    return " ".join(p for p in parts if p)


def main() -> None:
    # DeepSpeed calls torch.distributed functions torch has renamed; the
    # FutureWarning repeats every step and says nothing to a megagpt user.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated")
    register()
    precheck(sys.argv[1:])
    try:
        _hydra_main()
    except SystemExit as e:
        if e.code in (0, None):
            raise
        # A reported error (exit code 2).  Leave without the interpreter's
        # finalization: a gloo worker thread may still be releasing the tensors
        # of the last collective, and once finalization has begun it aborts the
        # process (SIGABRT, "terminate called without an active exception";
        # seen in 1 of 4 runs failing right after a broadcast), so torchrun
        # would report a crash instead of the one line and exit code 2.
        _end_process_group()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(e.code if isinstance(e.code, int) else 1)
    _end_process_group()


def _end_process_group() -> None:
    # The process group outlives each job: Hydra's `-m` without a launcher runs
    # the sweep's points one after another in this process, and DeepSpeed keeps
    # its groups from the first point (it cannot be initialized a second time).
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
