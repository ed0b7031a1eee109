"""The checks of a composed config that need more than types (divisibility,
positivity, required paths, settings that must agree across sections).
`validate()` runs once at start on every rank, before any heavy work, and
raises `ConfigError` with a one-line message naming the key.  The model's
own checks live with the model (megagpt/model/config.py: `check`); this
module runs them with the rest.  (The schema: megagpt/config.py.)
"""

from __future__ import annotations

from megagpt.config import Config, ConfigError
from megagpt.model.attention import sdpa_backend_problem
from megagpt.model.config import check as check_model
from megagpt.model.float8 import SETTINGS as FP8_SETTINGS
from megagpt.model.float8 import torchao_problem


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: Config, world_size: int = 1, cuda: bool | None = None) -> None:
    """Checks that need more than types. Raises ConfigError naming the key.
    `cuda`: whether the run will train on CUDA (None: whether a CUDA device is
    here, as runtime.device_for decides)."""
    m, d, t, o, ds, lg = cfg.model, cfg.data, cfg.trainer, cfg.optim, cfg.deepspeed, cfg.logger
    cuda = _cuda_here() if cuda is None else cuda
    check_model(m)
    _check_kernels(m, cuda)
    _require(
        m.max_seq_len is None or m.max_seq_len >= d.seq_len,
        "model.max_seq_len",
        f"{m.max_seq_len} is shorter than data.seq_len={d.seq_len}",
    )
    _require(
        m.sliding_window is None or m.sliding_window >= d.seq_len,
        "model.sliding_window",
        f"{m.sliding_window} is shorter than data.seq_len={d.seq_len}; megagpt computes full causal attention only",
    )

    _require(
        d.source in ("embedded", "webdataset", "mixture"),
        "data.source",
        f"unknown source {d.source!r}; choose embedded, webdataset or mixture",
    )
    if d.source == "webdataset":
        _require(
            d.urls not in (None, "", []),
            "data.urls",
            "missing: data=webdataset needs data.urls (shard pattern or prepared dataset dir)",
        )
    if d.source == "mixture":
        _require(len(d.sources) > 0, "data.sources", "missing: data=mixture needs a list of sources")
        names = [s.name for s in d.sources]
        _require(len(set(names)) == len(names), "data.sources", f"source names repeat: {names}")
        for i, s in enumerate(d.sources):
            _require(s.weight > 0, f"data.sources[{i}].weight", f"must be positive, got {s.weight}")
            _require(s.urls not in (None, "", []), f"data.sources[{i}].urls", "missing")
    _require(d.on_error in ("raise", "skip"), "data.on_error", f"unknown policy {d.on_error!r}; choose raise or skip")
    _require(d.verify in ("fast", "sha256"), "data.verify", f"unknown check {d.verify!r}; choose fast or sha256")
    _require(d.shuffle_buffer > 0, "data.shuffle_buffer", f"must be positive, got {d.shuffle_buffer}")
    _require(d.mix_period > 0, "data.mix_period", f"must be positive, got {d.mix_period}")
    _require(d.seq_len > 0, "data.seq_len", f"must be positive, got {d.seq_len}")
    _require(d.prefetch > 0, "data.prefetch", f"must be positive, got {d.prefetch}")
    if d.num_streams is not None:
        _require(d.num_streams > 0, "data.num_streams", f"must be positive, got {d.num_streams}")
        _require(
            d.num_streams % world_size == 0,
            "data.num_streams",
            f"{d.num_streams} is not divisible by the number of ranks ({world_size})",
        )

    for key in ("max_steps", "save_every", "log_every", "micro_batch_size", "grad_accum"):
        _require(getattr(t, key) > 0, f"trainer.{key}", f"must be positive, got {getattr(t, key)}")
    _require(t.resume != "", "trainer.resume", "must be auto, never or a checkpoint path")
    _require(t.eval_every >= 0, "trainer.eval_every", f"must be >= 0, got {t.eval_every}")
    _require(t.eval_batches > 0, "trainer.eval_batches", f"must be positive, got {t.eval_batches}")
    if t.global_batch_size is not None:
        per_step = t.micro_batch_size * world_size
        _require(t.global_batch_size > 0, "trainer.global_batch_size", f"must be positive, got {t.global_batch_size}")
        _require(
            t.global_batch_size % per_step == 0,
            "trainer.micro_batch_size",
            f"{t.micro_batch_size} x {world_size} ranks does not fit trainer.global_batch_size={t.global_batch_size}",
        )
        derived = t.global_batch_size // per_step
        _require(
            t.grad_accum in (1, derived),
            "trainer.grad_accum",
            f"{t.grad_accum} conflicts with trainer.global_batch_size={t.global_batch_size} (which implies {derived})",
        )
    _require(t.keep_last >= 0, "trainer.keep_last", f"must be >= 0 (0 keeps all), got {t.keep_last}")
    _require(
        t.on_nan in ("skip", "rollback", "stop"),
        "trainer.on_nan",
        f"unknown policy {t.on_nan!r}; choose skip, rollback or stop",
    )
    _require(t.max_nan_skips >= 0, "trainer.max_nan_skips", f"must be >= 0, got {t.max_nan_skips}")
    _require(t.max_rollbacks >= 0, "trainer.max_rollbacks", f"must be >= 0, got {t.max_rollbacks}")
    _require(t.spike_factor >= 0, "trainer.spike_factor", f"must be >= 0 (0: off), got {t.spike_factor}")
    _require(t.spike_window > 0, "trainer.spike_window", f"must be positive, got {t.spike_window}")
    _require(t.watchdog_seconds >= 0, "trainer.watchdog_seconds", f"must be >= 0 (0: off), got {t.watchdog_seconds}")
    _require(
        t.profile_steps >= 0 and t.profile_start >= 0,
        "trainer.profile_steps",
        "profile_steps and profile_start must be >= 0",
    )
    _require(t.peak_flops is None or t.peak_flops > 0, "trainer.peak_flops", "must be positive")
    _require(t.cpu_threads is None or t.cpu_threads > 0, "trainer.cpu_threads", "must be positive")

    _require(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    _require(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _require(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {o.grad_clip}")
    _require(0 <= o.beta1 < 1, "optim.beta1", f"must be in [0, 1), got {o.beta1}")
    _require(0 <= o.beta2 < 1, "optim.beta2", f"must be in [0, 1), got {o.beta2}")

    _require(ds.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"must be 0-3, got {ds.zero_stage}")
    _require(
        ds.precision in ("auto", "fp32", "bf16", "fp16"),
        "deepspeed.precision",
        f"unknown precision {ds.precision!r}; choose auto, fp32, bf16 or fp16",
    )
    # (With model.attention=auto, an fp32 run falls back to SDPA: run._try_flash.)
    flash_problem = flash_precision_problem(ds.precision)
    _require(
        m.attention != "flash_attn" or flash_problem is None,
        "model.attention",
        f"flash_attn {flash_problem}; use sdpa or auto",
    )
    _require(
        ds.backend in ("auto", "nccl", "gloo"),
        "deepspeed.backend",
        f"unknown backend {ds.backend!r}; choose auto, nccl or gloo",
    )
    _require(
        ds.stage3_param_persistence_threshold is None or ds.stage3_param_persistence_threshold >= 0,
        "deepspeed.stage3_param_persistence_threshold",
        f"must be >= 0 or null (auto: 10 x model.n_embd), got {ds.stage3_param_persistence_threshold}",
    )
    _require(
        ds.stage3_module_granularity_threshold >= 0,
        "deepspeed.stage3_module_granularity_threshold",
        f"must be >= 0 (0: off), got {ds.stage3_module_granularity_threshold}",
    )
    # ZeRO-3's module hooks: with any other stage these would do nothing, more likely a mistake than a wish.
    _require(
        not ds.stage3_leaf_blocks or ds.zero_stage == 3,
        "deepspeed.stage3_leaf_blocks",
        f"needs deepspeed.zero_stage=3, got {ds.zero_stage}",
    )
    _require(
        ds.stage3_memory_efficient_linear or ds.zero_stage == 3,
        "deepspeed.stage3_memory_efficient_linear",
        f"needs deepspeed.zero_stage=3, got {ds.zero_stage}",
    )
    _require(
        ds.stage3_module_granularity_threshold == 0 or ds.zero_stage == 3,
        "deepspeed.stage3_module_granularity_threshold",
        f"needs deepspeed.zero_stage=3, got {ds.zero_stage}",
    )
    # DeepSpeed compiles ZeRO stages 1-3 (runtime/engine.py: get_deepcompile_backend) and falls back
    # to plain torch.compile at stage 0; it needs engine.compile(), so model.compile must not be false.
    # CUDA only (deepspeed.compile.util.is_deepcompile_supported; ds_config.deepspeed_config refuses it too).
    _require(
        not ds.deepcompile or cuda,
        "deepspeed.deepcompile",
        "needs CUDA (DeepSpeed's DeepCompile); training runs on CPU here",
    )
    _require(
        not ds.deepcompile or ds.zero_stage in (1, 2, 3),
        "deepspeed.deepcompile",
        f"needs deepspeed.zero_stage 1, 2 or 3, got {ds.zero_stage}",
    )
    _require(
        not ds.deepcompile or m.compile is not False,
        "deepspeed.deepcompile",
        "compiles the model: it needs model.compile=true or null (auto), got false",
    )
    _require(cfg.export.max_shard_bytes > 0, "export.max_shard_bytes", "must be positive")
    _require(ds.timeout_minutes > 0, "deepspeed.timeout_minutes", "must be positive")

    _require(lg.kind in ("wandb", "none"), "logger.kind", f"unknown logger {lg.kind!r}; choose wandb or none")
    _require(lg.mode in ("offline", "online"), "logger.mode", f"unknown mode {lg.mode!r}; choose offline or online")


def flash_precision_problem(precision: str) -> str | None:
    """What keeps FlashAttention from training at `precision` (deepspeed.precision,
    as set or resolved), said of it ("takes ..."), or None: its kernels take fp16
    and bf16 only.  The one place this is checked: validate() refuses
    model.attention=flash_attn with it, and run._try_flash has auto fall back to SDPA."""
    return "takes fp16 or bf16, and deepspeed.precision is fp32" if precision == "fp32" else None


def _cuda_here() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_kernels(m, cuda: bool) -> None:
    """model.sdpa_backend (its checks: attention.sdpa_backend_problem) and
    model.fp8: what can be checked before the model and the device exist.  The
    device's own checks run where the model is built
    (attention.resolve_sdpa_backend, float8.check_fp8_supported)."""
    sdpa_may_run = m.attention in ("auto", "sdpa")  # SDPA gets document masking's mask only then
    problem = sdpa_backend_problem(m.sdpa_backend, cuda, m.doc_mask and sdpa_may_run)
    _require(problem is None, "model.sdpa_backend", str(problem))
    _require(m.fp8 in FP8_SETTINGS, "model.fp8", f"unknown recipe {m.fp8!r}; choose one of {FP8_SETTINGS}")
    _require(m.fp8_min_dim > 0, "model.fp8_min_dim", f"must be positive, got {m.fp8_min_dim}")
    if m.fp8 != "off":
        problem = torchao_problem()
        _require(problem is None, "model.fp8", str(problem))
        _require(
            cuda,
            "model.fp8",
            f"{m.fp8} needs a CUDA GPU of compute capability >= 8.9 (H100, H200, "
            "B200, L40S...); training runs on CPU here",
        )
