"""The typed config tree.

Each component owns a dataclass schema; Hydra composes the YAML presets under
`conf/` over these schemas (registered in the ConfigStore by `register()`), so an
unknown key or a value of the wrong type is rejected by Hydra itself (and by
`check_known_keys` for keys added with `+`).  Checks that need more than types
(divisibility, positivity, required paths) live in megagpt/config_checks.py
(`validate()`), which runs once at start on every rank, before any heavy work,
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
    """Where a run keeps its outputs, and the lock that gives that place one writer."""

    # Output directory: config.yaml, checkpoints/, metrics.jsonl, wandb/. None: derived from an id
    # every rank shares (the SLURM job, the torchrun run id; for a lone process its start time and
    # PID) under outputs/ (runtime.default_run_dir).
    dir: Optional[str] = None
    # A label kept with the run's recorded config (<run.dir>/config.yaml, each checkpoint, W&B's run
    # config); nothing else reads it (the W&B run's name is logger.name).
    name: Optional[str] = None
    # One job per run.dir (megagpt/run_lock.py).  A lock whose heartbeat (refreshed every 30 s) is this
    # many seconds old is stale: a new job takes it over.  300 s = ten missed beats, room for a stalled
    # filesystem client; it is also how long a job restarted on another host waits after a node failure
    # (a requeue of the same SLURM job, or a new job where the holder's PID is gone, takes over at once).
    lock_stale_seconds: float = 300.0


@dataclass
class ModelConfig:
    """The model's shape and computation. The model's own config, GPTConfig
    (megagpt/model/config.py), is this dataclass extended: the same fields,
    resolved; its checks are in that module's `check`."""

    # gpt2 (learned positions, LayerNorm, GELU MLP) | llama (RoPE, RMSNorm, SwiGLU MLP) |
    # mistral (llama's computation, exported as MistralForCausalLM; no biases) | qwen2 (llama's
    # computation with biases on q/k/v only: Qwen2, Qwen2.5) | qwen3 (llama's computation with
    # RMSNorm on each head of q and k, no biases): the rows of megagpt/model/families.py.
    family: str = "gpt2"
    # Transformer blocks.
    n_layer: int = 4
    # Query heads per attention layer; n_embd must be a multiple of it where model.head_dim is None.
    n_head: int = 4
    # Key/value heads; None: n_head. Fewer key/value heads than query heads (a divisor of n_head):
    # grouped-query attention.
    n_kv_head: Optional[int] = None
    # The size of each attention head. None: n_embd / n_head. Another size only in family qwen3
    # (Qwen3-0.6B: 16 heads of 128 at width 1024).
    head_dim: Optional[int] = None
    # The width: the size of the token embeddings and of the residual stream.
    n_embd: int = 128
    # Rows of the token embedding and the output head. None: the data tokenizer's vocabulary size.
    # Either is rounded up to a multiple of vocab_multiple.
    vocab_size: Optional[int] = None
    # The vocabulary size is rounded up to a multiple of this, for matmul-friendly shapes.
    vocab_multiple: int = 64
    # The longest sequence the model takes (gpt2: the rows of its learned position table); an export
    # writes it as n_positions or max_position_embeddings; generation stops there. None: data.seq_len.
    max_seq_len: Optional[int] = None
    # MLP width. None: the family's rule: mlp_ratio x n_embd (gpt2); 8/3 n_embd rounded up to
    # mlp_multiple (the rotary families).
    mlp_hidden: Optional[int] = None
    # gpt2: the MLP width is mlp_ratio x n_embd where mlp_hidden is None.
    mlp_ratio: int = 4
    # Rotary families: the SwiGLU width, 8/3 n_embd, is rounded up to a multiple of this where
    # mlp_hidden is None.
    mlp_multiple: int = 256
    # Dropout probability in training, on the embeddings, the attention weights and each block's two
    # residual branches (0: none).
    dropout: float = 0.0
    # Biases in the linear layers and LayerNorms (the output head and RMSNorm have none); families
    # mistral, qwen2 and qwen3 need false (qwen2's q/k/v biases are the family's, always there).
    bias: bool = True
    # The norms' epsilon (LayerNorm in gpt2, RMSNorm in the rotary families).
    norm_eps: float = 1e-5
    # Linear and embedding weights start as N(0, init_std); the two projections of each block that
    # write into the residual stream as N(0, init_std / sqrt(2 n_layer)).
    init_std: float = 0.02
    # Rotary families: the base of the rotary embeddings' frequencies, theta^(-2i / head_dim).
    rope_theta: float = 10000.0
    # RoPE frequency scaling (rotary families): None (off) | llama3, Llama 3.1's rule for contexts
    # longer than pretraining, which then needs the four rope_scaling_* values (config.json's
    # rope_scaling: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings).
    rope_scaling: Optional[str] = None
    # rope_scaling=llama3: the frequencies of long wavelengths are divided by this.
    rope_scaling_factor: Optional[float] = None
    # rope_scaling=llama3: wavelengths longer than rope_scaling_original_max_seq_len / this are
    # scaled fully.
    rope_scaling_low_freq_factor: Optional[float] = None
    # rope_scaling=llama3: wavelengths shorter than rope_scaling_original_max_seq_len / this keep
    # their frequency; those between the two bounds blend.
    rope_scaling_high_freq_factor: Optional[float] = None
    # rope_scaling=llama3: the context length the model was pretrained with (config.json's
    # original_max_position_embeddings).
    rope_scaling_original_max_seq_len: Optional[int] = None
    # A Hugging Face model folder (config.json, model.safetensors or its index, tokenizer.json)
    # to start from: its shape and weights, with a fresh optimizer (megagpt/hf_import.py).
    init_from: Optional[str] = None
    # Mistral's sliding attention window, kept so an export writes it back. megagpt computes
    # full causal attention only, so it must be None or cover every sequence it computes
    # (>= data.seq_len; generation stops there).
    sliding_window: Optional[int] = None
    # The output head shares the token embedding's weights.
    tie_embeddings: bool = True
    # auto (flash_attn on CUDA where FlashAttention is installed and can train the run: bf16 or fp16,
    # and a trial call at start passes; else sdpa) | flash_attn | sdpa | eager (the reference math).
    attention: str = "auto"
    # Tokens attend only within their own document of a packed sequence.
    doc_mask: bool = False
    # Recompute activations in backward: 0 none, 1 every block, k every k-th block.
    activation_checkpointing: int = 0
    # torch.compile each transformer block (GPT.compile_blocks). None (auto): on CUDA, off on CPU.
    compile: Optional[bool] = None
    # The loss without the full (tokens, vocab) fp32 logits: the output head and cross-entropy
    # in chunks of this many tokens (0: plain, one matmul and F.cross_entropy). None (auto):
    # chunked on CUDA (about 2^28 logits a chunk: 2048 tokens for llama 3's vocabulary, 5120 for
    # gpt2's), plain on CPU.
    loss_chunk_tokens: Optional[int] = None
    # SDPA's kernel on CUDA: auto (the faster of cudnn and flash, measured at start) | cudnn |
    # flash | efficient | math.
    sdpa_backend: str = "auto"
    # float8 training through torchao on H100-class GPUs: off | tensorwise | rowwise. Linear
    # layers with a dimension below fp8_min_dim (or not a multiple of 16), and the output head,
    # stay in bf16: small matmuls get slower in float8.
    fp8: str = "off"
    # fp8: Linear layers with a dimension below this stay in bf16.
    fp8_min_dim: int = 1024


@dataclass
class SourceConfig:
    """One source of a mixture: its shards and its share of the sequences."""

    # The source's name in the metrics (mix/<name>, data_epoch/<name>, val_loss/<name>); unique.
    name: str = MISSING
    # Its shards, as data.urls: a brace pattern, glob or list of shard URLs, or a prepared dataset dir.
    urls: Any = MISSING
    # Its share of the sequences: weight / the sum of all sources' weights; positive.
    weight: float = 1.0
    # Manifest path/URL; None: `manifest.json` beside the shards.
    manifest: Optional[str] = None


@dataclass
class DataConfig:
    """What a run reads: one source or a mixture of several, cut into sequences of seq_len tokens."""

    # embedded (the Python standard library's sources, prepared once into data.cache_dir) |
    # webdataset (the shards of data.urls) | mixture (data.sources).
    source: str = "embedded"
    # webdataset: shard URLs (brace pattern, glob, list) or a prepared dataset dir.
    urls: Any = None
    # Manifest path/URL; None: `manifest.json` beside the shards.
    manifest: Optional[str] = None
    # Tokens per training sequence (each is read as a window of seq_len + 1 tokens: inputs and targets).
    seq_len: int = 128
    # Independent sub-streams the shards are dealt into; the number of ranks must divide it, and it
    # stays the same across resumes.  None: the largest multiple of the world size that is at most 16
    # and at most the number of shards (at least the world size).
    num_streams: Optional[int] = None
    # A new shard order every epoch, drawn from trainer.seed; false: the manifest's order.
    shuffle_shards: bool = True
    # Windows are shuffled within blocks of this many (1: no shuffle); exact on resume.
    shuffle_buffer: int = 64
    # raise: stop every rank at a bad shard; skip: drop it whole, log and count it.
    on_error: str = "raise"
    # The checksum every shard read is checked against: fast (the manifest's
    # xxh3_128, ~10 GB/s; sha256 for manifests without it) or sha256 (~1 GB/s).
    verify: str = "fast"
    # data=mixture: the sources and their weights.
    sources: List[SourceConfig] = field(default_factory=list)
    # data=mixture: in every block of this many windows each source has its weight's share of places.
    mix_period: int = 100
    # Micro-batches each rank's loader thread keeps ready ahead of training.
    prefetch: int = 4
    # data=embedded: where the corpus is prepared and kept. None: $MEGAGPT_CACHE, else ~/.cache/megagpt.
    cache_dir: Optional[str] = None
    # data=embedded: the vocabulary size of the byte-level BPE tokenizer trained on the corpus.
    embedded_vocab_size: int = 4096
    # data=embedded: the corpus is the standard library's .py files, in path order, up to this many bytes.
    embedded_max_bytes: int = 6_000_000


@dataclass
class OptimConfig:
    """AdamW, and its learning rate: a linear warmup, then a cosine decay to lr x min_lr_ratio at
    trainer.max_steps."""

    # The peak learning rate, reached at the end of the warmup.
    lr: float = 1e-3
    # The cosine decay ends at lr x min_lr_ratio, at trainer.max_steps.
    min_lr_ratio: float = 0.1
    # Steps of linear warmup from lr / warmup_steps to lr (0 counts as 1).
    warmup_steps: int = 20
    # AdamW's decoupled weight decay, on the weights of linear and embedding layers (not on biases
    # or norm gains).
    weight_decay: float = 0.1
    # AdamW's decay rate of the gradient's running mean.
    beta1: float = 0.9
    # AdamW's decay rate of the squared gradient's running mean.
    beta2: float = 0.95
    # AdamW's epsilon, added to the denominator.
    eps: float = 1e-8
    # Gradients are clipped to this global norm (0: no clipping).
    grad_clip: float = 1.0
    # torch.optim.AdamW's fused kernel: None (auto) uses it where torch has one for the device.
    fused: Optional[bool] = None


@dataclass
class DeepSpeedConfig:
    """DeepSpeed's engine: the ZeRO stage, the precision, the process group and ZeRO-3's
    trade-offs between memory and speed (megagpt/engine/ds_config.py writes DeepSpeed's config
    from them)."""

    # ZeRO stage: 0 (plain data parallelism), 1 (the optimizer state sharded across ranks), 2 (and
    # the gradients), 3 (and the parameters). A checkpoint resumes at the stage it was written with.
    zero_stage: int = 3
    # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    precision: str = "auto"
    # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    backend: str = "auto"
    # ZeRO stages 1-3 on CUDA: reduce gradients while backward goes on (always off on CPU).
    overlap_comm: bool = True
    # ZeRO stages 1-3: gradients are reduced in buckets of this many elements.
    reduce_bucket_size: int = 50_000_000
    # ZeRO-3: parameter elements gathered ahead of their use.
    stage3_prefetch_bucket_size: int = 50_000_000
    # Parameters of at most this many elements stay whole on every rank, not gathered each step.
    # None (auto): 10 x the model width, as Hugging Face's integration sizes it.
    stage3_param_persistence_threshold: Optional[int] = None
    # ZeRO-3 treats each transformer block as one leaf (one gather for all its parameters,
    # no hooks inside it): DeepSpeed's set_z3_leaf_modules.  None (auto): on where the model
    # is compiled (model.compile), which compiles each block (engine.leaf_blocks).
    stage3_leaf_blocks: Optional[bool] = None
    # Modules with fewer parameters than this are folded into their parent for ZeRO-3's
    # hooks (stage3_module_granularity_threshold; 0: off). A value that would make the whole
    # model one leaf is refused: DeepSpeed cannot train that.
    stage3_module_granularity_threshold: int = 0
    # DeepSpeed's memory-efficient linear (ZeRO-3; DeepSpeed's default): F.linear replaced, for
    # the whole process, by an autograd Function that keeps the parameter, not a view of its
    # gathered weight, for backward, so a released weight is freed between forward and backward.
    # false keeps torch's F.linear: fewer Python calls per linear layer, gathered weights held
    # until backward.
    stage3_memory_efficient_linear: bool = True
    # DeepSpeed's DeepCompile (compiles ZeRO-3's gathers into the graph; CUDA only, ZeRO stages
    # 1-3, model.compile true or null).
    deepcompile: bool = False
    # ZeRO-3: gathered parameters (elements) a rank keeps before it releases them: lower it to
    # save memory at the cost of gathering more often (DeepSpeed's default).
    stage3_max_live_parameters: int = 1_000_000_000
    # ZeRO-3: a gathered parameter used again within this many parameters (elements) is kept, not
    # released: lower it to save memory at the cost of gathering again (DeepSpeed's default).
    stage3_max_reuse_distance: int = 1_000_000_000
    # How long a rank waits for the others (start-up and every collective) before failing.
    timeout_minutes: int = 30


@dataclass
class LoggerConfig:
    """Where the metrics go besides <run.dir>/metrics.jsonl and the console: Weights & Biases."""

    # wandb | none (metrics.jsonl and the console only)
    kind: str = "wandb"
    # offline (into <run.dir>/wandb, for `wandb sync`) | online (needs W&B credentials; without
    # them, or when W&B cannot be reached, the run logs offline)
    mode: str = "offline"
    # The W&B project.
    project: str = "megagpt"
    # The W&B entity (user or team); None: the account's default.
    entity: Optional[str] = None
    # The W&B run's display name; None: W&B chooses one.
    name: Optional[str] = None
    # The W&B group the run is shown in.
    group: Optional[str] = None
    # The W&B run's tags.
    tags: List[str] = field(default_factory=list)


@dataclass
class TrainerConfig:
    """The training loop: its length and batch, checkpoints and resume, logging and validation, and
    what keeps a long run alive."""

    # Optimizer steps to train for; the learning rate's cosine decay ends here.
    max_steps: int = 200
    # A checkpoint every this many steps, and at the last step.
    save_every: int = 100
    # Metrics every this many steps and at the last (console, metrics.jsonl, W&B); the loss is the
    # mean over the steps since the previous record.
    log_every: int = 10
    # Seeds the weight initialisation, the data order (shard order, window shuffle, mixture
    # schedule) and each rank's random state (dropout).
    seed: int = 1234
    # auto (the newest checkpoint in run.dir that verifies; none there: start fresh) | never (start
    # fresh) | a checkpoint path
    resume: str = "auto"
    # Sequences per rank in one forward and backward pass.
    micro_batch_size: int = 8
    # Micro-batches per rank accumulated into one optimizer step (derived from global_batch_size
    # where that is set).
    grad_accum: int = 1
    # None: micro_batch_size * grad_accum * world size.  Set, it fixes the
    # batch across world sizes and grad_accum is derived from it.
    global_batch_size: Optional[int] = None
    # Peak FLOP/s per device for MFU; None: a table for GPUs, measured on CPU.
    peak_flops: Optional[float] = None
    # Validation on the held-out shards every this many steps and at the last step (0: never);
    # data without held-out shards has none.
    eval_every: int = 50
    # Micro-batches per rank and per source at each validation: the same held-out sequences each time.
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
    # on_nan=skip: updates skipped in a row before a rollback to the newest verified checkpoint.
    max_nan_skips: int = 3
    # Rollbacks (to the newest verified checkpoint; the data goes on past the windows that led
    # there) after which a non-finite loss or gradient stops the run.
    max_rollbacks: int = 2
    # A loss above spike_factor x the mean of the last spike_window losses is logged as a spike
    # (0: off).
    spike_factor: float = 1.5
    # Losses the spike check averages; it starts once it has seen this many.
    spike_window: int = 50
    # No step finished for this long: dump every thread's stack and exit non-zero (0: off).
    watchdog_seconds: float = 1800.0
    # A stop request (SIGUSR1, SIGTERM, the stop file) always saves and stops; true: the SLURM job is
    # also requeued (by slurm/pretrain.sh once every rank has exited, else with `scontrol requeue`).
    requeue: bool = True
    # Profile steps profile_start+1 .. profile_start+profile_steps with torch.profiler on every
    # rank; a summary of where the time went goes to <run.dir>/profile/rank<R>.json (0: off).
    profile_steps: int = 0
    # Steps run before profiling starts (see profile_steps), so that start-up costs stay out of it.
    profile_start: int = 3


@dataclass
class ExportConfig:
    """The Hugging Face export of the final checkpoint at the end of training."""

    # Export the final checkpoint to a Hugging Face folder when training finishes.
    at_end: bool = False
    # Where the export at the end goes. None: <run.dir>/hf.
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


def yaml_syntax_error(e: Exception) -> ConfigError:
    """The one line for a config file YAML cannot parse (a yaml.MarkedYAMLError):
    `<file>:<line>:<column>: YAML syntax error: <problem> (<context> at line L, column C)`,
    lines and columns counted from 1 as editors do (yaml's marks count from 0)."""

    def at(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"{mark.name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else "config file"
    problem = getattr(e, "problem", None) or getattr(e, "context", None) or str(e).splitlines()[0]
    context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and context != problem:
        problem += f" ({context}{f' at {at(context_mark)}' if context_mark is not None else ''})"
    return ConfigError(f"{where}: YAML syntax error: {problem}")


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


def grad_accum(t: TrainerConfig, world_size: int) -> int:
    if t.global_batch_size is None:
        return t.grad_accum
    return t.global_batch_size // (t.micro_batch_size * world_size)


def global_batch(t: TrainerConfig, world_size: int) -> int:
    return t.micro_batch_size * grad_accum(t, world_size) * world_size
