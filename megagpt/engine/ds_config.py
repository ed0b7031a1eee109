"""DeepSpeed's JSON config, from megagpt's: the batch, ZeRO, the warmup + cosine
schedule, gradient clipping, precision and DeepCompile.  (The optimizer is
megagpt's own: optimizer.py; DeepSpeed wraps it.  ZeRO-3's leaf blocks,
deepspeed.stage3_leaf_blocks, are set on the model: build.build_engine.)"""

from __future__ import annotations

from megagpt.config import Config, ConfigError, global_batch, grad_accum


def resolve_precision(name: str, device_type: str) -> str:
    if name == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return name


def persistence_threshold(setting: int | None, n_embd: int) -> int:
    """deepspeed.stage3_param_persistence_threshold: None (auto) is 10 x the model's width, Hugging
    Face's rule (its DeepSpeed integration's "auto"): the norms' gains and the biases stay whole
    on every rank (no gather per use), the weight matrices are partitioned."""
    return 10 * n_embd if setting is None else setting


def deepspeed_config(cfg: Config, world_size: int, device_type: str, n_embd: int | None = None) -> dict:
    """`n_embd`: the model's width (the built model's: model.init_from's folder sets it); by
    default model.n_embd."""
    t, o, ds = cfg.trainer, cfg.optim, cfg.deepspeed
    precision = resolve_precision(ds.precision, device_type)
    if ds.deepcompile and device_type != "cuda":
        # DeepSpeed enables it on CUDA only (deepspeed.compile.util.is_deepcompile_supported).
        raise ConfigError(f"deepspeed.deepcompile: needs CUDA (DeepSpeed's DeepCompile); this run is on {device_type}")
    warmup = max(1, o.warmup_steps)
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(
            reduce_bucket_size=ds.reduce_bucket_size,
            contiguous_gradients=True,
            overlap_comm=ds.overlap_comm and device_type == "cuda",
        )
    if ds.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=persistence_threshold(
                ds.stage3_param_persistence_threshold, cfg.model.n_embd if n_embd is None else n_embd
            ),
            stage3_module_granularity_threshold=ds.stage3_module_granularity_threshold,
            stage3_max_live_parameters=ds.stage3_max_live_parameters,
            stage3_max_reuse_distance=ds.stage3_max_reuse_distance,
            memory_efficient_linear=ds.stage3_memory_efficient_linear,
            # Checkpoints hold the ZeRO shards; export consolidates them offline.
            stage3_gather_16bit_weights_on_model_save=False,
        )
    extra = {"compile": {"deepcompile": True}} if ds.deepcompile else {}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum(t, world_size),
        "train_batch_size": global_batch(t, world_size),
        "gradient_clipping": o.grad_clip,
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": t.max_steps,
                "warmup_num_steps": warmup,
                "warmup_type": "linear",
                # Start warmup at lr / warmup rather than 0 so step 1 already learns.
                "warmup_min_ratio": 1.0 / warmup,
                "cos_min_ratio": o.min_lr_ratio,
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        **extra,
    }
