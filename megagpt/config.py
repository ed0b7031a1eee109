"""The typed config tree.

Each component owns a dataclass schema; Hydra composes the YAML presets under
`conf/` over these schemas (registered in the ConfigStore by `register()`), so an
unknown key or a value of the wrong type is rejected by Hydra itself.  Checks
that need more than types (divisibility, positivity, required paths) live in
`validate()`, which runs once at start on every rank, before any heavy work,
and raises `ConfigError` with a one-line message naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING


class ConfigError(ValueError):
    """A config value is invalid; the message is one line and names the key."""


@dataclass
class RunConfig:
    # Output directory. None: derived from an id every rank shares (see run_dir.py).
    dir: Optional[str] = None
    name: Optional[str] = None


@dataclass
class ModelConfig:
    # gpt2 (learned positions, LayerNorm, GELU, tied) | llama (RoPE, RMSNorm, SwiGLU, GQA)
    family: str = "gpt2"
    n_layer: int = 4
    n_head: int = 4
    # None: n_head. Fewer key/value heads than query heads: grouped-query attention.
    n_kv_head: Optional[int] = None
    n_embd: int = 128
    # None: taken from the data's tokenizer (rounded up to `vocab_multiple`).
    vocab_size: Optional[int] = None
    vocab_multiple: int = 64
    # None: equal to data.seq_len.
    max_seq_len: Optional[int] = None
    # MLP width. None: mlp_ratio x n_embd (gpt2); 8/3 n_embd rounded up to mlp_multiple (llama).
    mlp_hidden: Optional[int] = None
    mlp_ratio: int = 4
    mlp_multiple: int = 256
    dropout: float = 0.0
    bias: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    # auto | flash_attn | sdpa | eager
    attention: str = "auto"
    # Tokens attend only within their own document of a packed sequence.
    doc_mask: bool = False
    # Recompute activations in backward: 0 none, 1 every block, k every k-th block.
    activation_checkpointing: int = 0
    # torch.compile the model (through DeepSpeed's engine.compile).
    compile: bool = False


@dataclass
class SourceConfig:
    """One source of a mixture: its shards and its share of the sequences."""
    name: str = MISSING
    urls: Any = MISSING
    weight: float = 1.0
    manifest: Optional[str] = None


@dataclass
class DataConfig:
    # embedded | webdataset | mixture
    source: str = "embedded"
    # webdataset: shard URLs (brace pattern, glob, list) or a prepared dataset dir.
    urls: Any = None
    # Manifest path/URL; None: `manifest.json` beside the shards.
    manifest: Optional[str] = None
    seq_len: int = 256
    # Independent sub-streams the shards are dealt into; the number of ranks
    # must divide it.  None: 16 if the world size divides 16, else the world size.
    num_streams: Optional[int] = None
    shuffle_shards: bool = True
    # Windows are shuffled within blocks of this many (1: no shuffle); exact on resume.
    shuffle_buffer: int = 64
    # raise: stop every rank at a bad shard; skip: drop it whole, log and count it.
    on_error: str = "raise"
    # The checksum every shard read is checked against: fast (the manifest's
    # xxh3_128, ~10 GB/s; sha256 for manifests without it) or sha256 (~1 GB/s).
    verify: str = "fast"
    # data=mixture: the sources and their weights; windows per mixing block.
    sources: List[SourceConfig] = field(default_factory=list)
    mix_period: int = 100
    prefetch: int = 4
    # embedded corpus
    cache_dir: Optional[str] = None
    embedded_vocab_size: int = 4096
    embedded_max_bytes: int = 6_000_000


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    # torch.optim.AdamW's fused kernel: None (auto) uses it where torch has one for the device.
    fused: Optional[bool] = None


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 3
    # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    precision: str = "auto"
    # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    backend: str = "auto"
    overlap_comm: bool = True
    reduce_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 10_000
    # Gathered parameters kept between forward and backward (elements): lower them to
    # save memory at the cost of gathering again in backward (DeepSpeed's defaults).
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_max_reuse_distance: int = 1_000_000_000
    timeout_minutes: int = 30


@dataclass
class LoggerConfig:
    # wandb | none
    kind: str = "wandb"
    # offline | online
    mode: str = "offline"
    project: str = "megagpt"
    entity: Optional[str] = None
    name: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class TrainerConfig:
    max_steps: int = 200
    save_every: int = 100
    log_every: int = 10
    seed: int = 1234
    # auto (newest checkpoint in run.dir) | never | a checkpoint path
    resume: str = "auto"
    micro_batch_size: int = 8
    grad_accum: int = 1
    # None: micro_batch_size * grad_accum * world size.  Set, it fixes the
    # batch across world sizes and grad_accum is derived from it.
    global_batch_size: Optional[int] = None
    # Peak FLOP/s per device for MFU; None: a table for GPUs, measured on CPU.
    peak_flops: Optional[float] = None
    # Validation every this many steps (0: never) on eval_batches micro-batches per rank.
    eval_every: int = 0
    eval_batches: int = 4
    # CPU threads per process; None: cores divided among local ranks.
    cpu_threads: Optional[int] = None
    # Keep only the newest K checkpoints (0: keep all). The newest is never deleted.
    keep_last: int = 0
    # Hash, fsync and commit checkpoints in a background thread (training waits only for the write).
    async_save: bool = False
    # Non-finite loss or gradient: skip (skip the update, then roll back after max_nan_skips
    # consecutive skips, then stop after max_rollbacks) | rollback (at once) | stop.
    on_nan: str = "skip"
    max_nan_skips: int = 3
    max_rollbacks: int = 2
    # A loss above spike_factor x the mean of the last spike_window losses is logged as a spike.
    spike_factor: float = 1.5
    spike_window: int = 50
    # No step finished for this long: dump every thread's stack and exit non-zero (0: off).
    watchdog_seconds: float = 1800.0
    # On SIGUSR1 / SIGTERM / the stop file: save, then `scontrol requeue` the SLURM job.
    requeue: bool = True
    # Profile steps profile_start+1 .. profile_start+profile_steps with torch.profiler on every
    # rank; a summary of where the time went goes to <run.dir>/profile/rank<R>.json (0: off).
    profile_steps: int = 0
    profile_start: int = 3


@dataclass
class ExportConfig:
    # Export the final checkpoint to a Hugging Face folder when training finishes.
    at_end: bool = False
    # None: <run.dir>/hf
    dir: Optional[str] = None
    # Split model.safetensors into shards of at most this many bytes.
    max_shard_bytes: int = 5 * 2**30


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    deepspeed: DeepSpeedConfig = MISSING
    logger: LoggerConfig = MISSING
    trainer: TrainerConfig = MISSING


def register() -> None:
    """Register the schemas so `conf/` presets can extend them."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="optim", name="base_optim", node=OptimConfig)
    cs.store(group="deepspeed", name="base_deepspeed", node=DeepSpeedConfig)
    cs.store(group="logger", name="base_logger", node=LoggerConfig)
    cs.store(group="trainer", name="base_trainer", node=TrainerConfig)


def unknown_key_error(full_key: str, schema: type | None) -> ConfigError:
    """The one line for a key the schema does not have, the same whichever way
    it came in (a plain override, `+key=`, `++key=`, a preset file)."""
    import dataclasses
    import difflib

    parent, _, key = full_key.rpartition(".")
    owner = schema.__name__ if isinstance(schema, type) else "the config"
    hint = ""
    if dataclasses.is_dataclass(schema):
        close = difflib.get_close_matches(key, [f.name for f in dataclasses.fields(schema)], n=1)
        if close:
            hint = f"; did you mean {parent + '.' if parent else ''}{close[0]}?"
    return ConfigError(f"{full_key}: unknown key ({owner} has no setting {key!r}{hint})")


def check_known_keys(node: Any, path: str = "") -> None:
    """Raise ConfigError for the first key of a composed config that is not in
    the schema.  Hydra rejects an unknown `key=value`, but `+key=value` and
    `++key=value` add the key to the structured config and OmegaConf carries
    it along unread: a typo such as `+trainer.max_step=100` would leave the
    default in force without a word.  Hydra's own node (`hydra`) is not ours
    to check."""
    import dataclasses

    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, ListConfig):
        for i in range(len(node)):
            check_known_keys(node._get_node(i), f"{path}[{i}]")
        return
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    known = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node.keys():
        if not path and key == "hydra":
            continue
        full_key = f"{path}.{key}" if path else str(key)
        if known is not None and key not in known:
            raise unknown_key_error(full_key, schema)
        if known is not None:  # free-form values (e.g. data.urls: Any) are not walked
            check_known_keys(node._get_node(key), full_key)


ATTENTION = ("auto", "flash_attn", "sdpa", "eager")
FAMILIES = ("gpt2", "llama")


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: Config, world_size: int = 1) -> None:
    """Checks that need more than types. Raises ConfigError naming the key."""
    m, d, t, o, ds, lg = cfg.model, cfg.data, cfg.trainer, cfg.optim, cfg.deepspeed, cfg.logger
    for key in ("n_layer", "n_head", "n_embd", "mlp_ratio", "vocab_multiple"):
        _require(getattr(m, key) > 0, f"model.{key}", f"must be positive, got {getattr(m, key)}")
    _require(m.n_embd % m.n_head == 0, "model.n_embd",
             f"{m.n_embd} is not divisible by model.n_head={m.n_head}")
    kv = m.n_kv_head if m.n_kv_head is not None else m.n_head
    _require(kv > 0 and m.n_head % kv == 0, "model.n_kv_head",
             f"{m.n_kv_head} must be positive and divide model.n_head={m.n_head}")
    _require(m.mlp_hidden is None or m.mlp_hidden > 0, "model.mlp_hidden", f"must be positive, got {m.mlp_hidden}")
    _require(m.mlp_multiple > 0, "model.mlp_multiple", f"must be positive, got {m.mlp_multiple}")
    _require(m.rope_theta > 0, "model.rope_theta", f"must be positive, got {m.rope_theta}")
    _require(m.activation_checkpointing >= 0, "model.activation_checkpointing",
             f"must be 0 (off) or k >= 1 (every k-th block), got {m.activation_checkpointing}")
    if m.family == "llama":
        _require((m.n_embd // m.n_head) % 2 == 0, "model.n_embd",
                 f"rotary embeddings need an even head dim, got {m.n_embd // m.n_head}")
    _require(m.family in FAMILIES, "model.family", f"unknown family {m.family!r}; choose one of {FAMILIES}")
    _require(m.attention in ATTENTION, "model.attention",
             f"unknown backend {m.attention!r}; choose one of {ATTENTION}")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _require(m.vocab_size is None or m.vocab_size > 1, "model.vocab_size", f"must be > 1, got {m.vocab_size}")
    _require(m.max_seq_len is None or m.max_seq_len >= d.seq_len, "model.max_seq_len",
             f"{m.max_seq_len} is shorter than data.seq_len={d.seq_len}")

    _require(d.source in ("embedded", "webdataset", "mixture"), "data.source",
             f"unknown source {d.source!r}; choose embedded, webdataset or mixture")
    if d.source == "webdataset":
        _require(d.urls not in (None, "", []), "data.urls",
                 "missing: data=webdataset needs data.urls (shard pattern or prepared dataset dir)")
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
        _require(d.num_streams % world_size == 0, "data.num_streams",
                 f"{d.num_streams} is not divisible by the number of ranks ({world_size})")

    for key in ("max_steps", "save_every", "log_every", "micro_batch_size", "grad_accum"):
        _require(getattr(t, key) > 0, f"trainer.{key}", f"must be positive, got {getattr(t, key)}")
    _require(t.resume != "", "trainer.resume", "must be auto, never or a checkpoint path")
    _require(t.eval_every >= 0, "trainer.eval_every", f"must be >= 0, got {t.eval_every}")
    _require(t.eval_batches > 0, "trainer.eval_batches", f"must be positive, got {t.eval_batches}")
    if t.global_batch_size is not None:
        per_step = t.micro_batch_size * world_size
        _require(t.global_batch_size > 0, "trainer.global_batch_size",
                 f"must be positive, got {t.global_batch_size}")
        _require(t.global_batch_size % per_step == 0, "trainer.micro_batch_size",
                 f"{t.micro_batch_size} x {world_size} ranks does not fit "
                 f"trainer.global_batch_size={t.global_batch_size}")
        derived = t.global_batch_size // per_step
        _require(t.grad_accum in (1, derived), "trainer.grad_accum",
                 f"{t.grad_accum} conflicts with trainer.global_batch_size={t.global_batch_size} "
                 f"(which implies {derived})")
    _require(t.keep_last >= 0, "trainer.keep_last", f"must be >= 0 (0 keeps all), got {t.keep_last}")
    _require(t.on_nan in ("skip", "rollback", "stop"), "trainer.on_nan",
             f"unknown policy {t.on_nan!r}; choose skip, rollback or stop")
    _require(t.max_nan_skips >= 0, "trainer.max_nan_skips", f"must be >= 0, got {t.max_nan_skips}")
    _require(t.max_rollbacks >= 0, "trainer.max_rollbacks", f"must be >= 0, got {t.max_rollbacks}")
    _require(t.spike_factor >= 0, "trainer.spike_factor", f"must be >= 0 (0: off), got {t.spike_factor}")
    _require(t.spike_window > 0, "trainer.spike_window", f"must be positive, got {t.spike_window}")
    _require(t.watchdog_seconds >= 0, "trainer.watchdog_seconds", f"must be >= 0 (0: off), got {t.watchdog_seconds}")
    _require(t.profile_steps >= 0 and t.profile_start >= 0, "trainer.profile_steps",
             "profile_steps and profile_start must be >= 0")
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
    _require(ds.precision in ("auto", "fp32", "bf16", "fp16"), "deepspeed.precision",
             f"unknown precision {ds.precision!r}; choose auto, fp32, bf16 or fp16")
    _require(ds.backend in ("auto", "nccl", "gloo"), "deepspeed.backend",
             f"unknown backend {ds.backend!r}; choose auto, nccl or gloo")
    _require(cfg.export.max_shard_bytes > 0, "export.max_shard_bytes", "must be positive")
    _require(ds.timeout_minutes > 0, "deepspeed.timeout_minutes", "must be positive")

    _require(lg.kind in ("wandb", "none"), "logger.kind", f"unknown logger {lg.kind!r}; choose wandb or none")
    _require(lg.mode in ("offline", "online"), "logger.mode", f"unknown mode {lg.mode!r}; choose offline or online")


def grad_accum(t: TrainerConfig, world_size: int) -> int:
    if t.global_batch_size is None:
        return t.grad_accum
    return t.global_batch_size // (t.micro_batch_size * world_size)


def global_batch(t: TrainerConfig, world_size: int) -> int:
    return t.micro_batch_size * grad_accum(t, world_size) * world_size
