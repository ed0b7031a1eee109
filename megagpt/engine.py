"""The one place where the plain model meets DeepSpeed.

`deepspeed_config` turns the Hydra config into DeepSpeed's JSON config;
`build_engine` constructs the model inside `deepspeed.zero.Init` (ZeRO-3: each
parameter is partitioned as soon as its module is built, so no rank ever holds
the whole model), initialises the weights module by module, and wraps it all
in a DeepSpeed engine with AdamW and the warmup + cosine schedule.
"""

from __future__ import annotations

import logging

import torch

from megagpt.config import Config, global_batch, grad_accum
from megagpt.model.gpt import GPT, GPTConfig, decay_groups

log = logging.getLogger("megagpt")


def resolve_precision(name: str, device_type: str) -> str:
    if name == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return name


def deepspeed_config(cfg: Config, world_size: int, device_type: str) -> dict:
    t, o, ds = cfg.trainer, cfg.optim, cfg.deepspeed
    precision = resolve_precision(ds.precision, device_type)
    warmup = max(1, o.warmup_steps)
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(reduce_bucket_size=ds.reduce_bucket_size, contiguous_gradients=True,
                    overlap_comm=ds.overlap_comm and device_type == "cuda")
    if ds.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
                    stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
                    # Checkpoints hold the ZeRO shards; export consolidates them offline.
                    stage3_gather_16bit_weights_on_model_save=False)
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum(t, world_size),
        "train_batch_size": global_batch(t, world_size),
        "gradient_clipping": o.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps,
                "weight_decay": o.weight_decay,
                # torch.optim.AdamW: runs everywhere without building DeepSpeed ops.
                "torch_adam": True,
            },
        },
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
    }


def build_model_config(cfg: Config, vocab_size: int, attention: str) -> GPTConfig:
    m = cfg.model
    v = m.vocab_size or vocab_size
    v = -(-v // m.vocab_multiple) * m.vocab_multiple  # pad for matmul-friendly shapes
    return GPTConfig(vocab_size=v, max_seq_len=m.max_seq_len or cfg.data.seq_len,
                     n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, mlp_ratio=m.mlp_ratio,
                     dropout=m.dropout, bias=m.bias, norm_eps=m.norm_eps, init_std=m.init_std,
                     attention=attention)


def build_engine(cfg: Config, gcfg: GPTConfig, ds_config: dict, rank: int):
    """Returns (engine, model). The model is built sharded under ZeRO-3."""
    import deepspeed

    stage3 = cfg.deepspeed.zero_stage == 3
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=stage3):
        model = GPT(gcfg)
    init_weights(model, cfg.trainer.seed, rank, stage3)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=decay_groups(model, cfg.optim.weight_decay), config=ds_config)
    return engine, model


def init_weights(model: GPT, seed: int, rank: int, sharded: bool) -> None:
    """Same weights for any world size and ZeRO stage: one generator walks the
    modules in order. Sharded, each module's parameters are gathered, rank 0
    writes them, and DeepSpeed re-partitions (broadcasting rank 0's values)."""
    if not sharded:
        model.init_weights(seed)
        return
    import deepspeed

    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if rank == 0:
                model.init_module_(module, gen)
