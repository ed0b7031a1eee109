"""The one place where the plain model meets DeepSpeed.

`deepspeed_config` turns the Hydra config into DeepSpeed's JSON config;
`build_engine` constructs the model inside `deepspeed.zero.Init` (ZeRO-3: each
parameter is partitioned as soon as its module is built, so no rank ever holds
the whole model), initialises the weights module by module, and wraps it all
in a DeepSpeed engine with torch's AdamW (fused where available) and the
warmup + cosine schedule, optionally compiled with torch.compile.
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
                    stage3_max_live_parameters=ds.stage3_max_live_parameters,
                    stage3_max_reuse_distance=ds.stage3_max_reuse_distance,
                    # Checkpoints hold the ZeRO shards; export consolidates them offline.
                    stage3_gather_16bit_weights_on_model_save=False)
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
    }


def build_model_config(cfg: Config, vocab_size: int, attention: str, eod_id: int | None = None) -> GPTConfig:
    m = cfg.model
    v = m.vocab_size or vocab_size
    v = -(-v // m.vocab_multiple) * m.vocab_multiple  # pad for matmul-friendly shapes
    hidden = m.mlp_hidden
    if hidden is None and m.family == "gpt2":
        hidden = m.mlp_ratio * m.n_embd
    return GPTConfig(vocab_size=v, max_seq_len=m.max_seq_len or cfg.data.seq_len, family=m.family,
                     n_layer=m.n_layer, n_head=m.n_head, n_kv_head=m.n_kv_head, n_embd=m.n_embd,
                     mlp_hidden=hidden, mlp_multiple=m.mlp_multiple, dropout=m.dropout, bias=m.bias,
                     norm_eps=m.norm_eps, init_std=m.init_std, rope_theta=m.rope_theta,
                     tie_embeddings=m.tie_embeddings, attention=attention, doc_mask=m.doc_mask,
                     eod_id=eod_id, checkpoint_every=m.activation_checkpointing)


def use_fused_adamw(setting: bool | None, device_type: str) -> bool:
    """torch has fused AdamW kernels for CUDA and (since 2.4) CPU; auto uses them there."""
    if setting is not None:
        return setting
    return device_type in ("cuda", "cpu")


class GuardedAdamW(torch.optim.AdamW):
    """torch's AdamW that skips the update when any rank saw a non-finite
    loss (`loss_ok`, set by the trainer) or holds a non-finite gradient.

    The ranks agree with one all-reduce before anything is updated.  Under
    ZeRO the optimizer is stepped once per parameter sub-group; the first call
    of a step decides for all of them (`new_step()` resets).  ZeRO-1..3 also
    skip a step by themselves when the global gradient norm is not finite."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_ok = True
        self.skipped = False
        self._decided = False

    def new_step(self, loss_ok: bool) -> None:
        self.loss_ok, self.skipped, self._decided = loss_ok, False, False

    @torch.no_grad()
    def step(self, closure=None):
        if not self._decided:
            self.skipped = not self._agree_finite()
            self._decided = True
        if self.skipped:
            return None
        return super().step(closure)

    def _agree_finite(self) -> bool:
        import torch.distributed as dist

        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        ok = self.loss_ok
        if ok and grads:
            norms = torch._foreach_norm(grads)
            ok = bool(torch.isfinite(torch.stack(norms)).all())
        bad = torch.tensor([0.0 if ok else 1.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0.0


def build_optimizer(cfg: Config, model: torch.nn.Module, device_type: str) -> GuardedAdamW:
    """torch.optim.AdamW with decay / no-decay groups; DeepSpeed wraps it
    (ZeRO partitions its state) and drives the learning-rate schedule."""
    o = cfg.optim
    return GuardedAdamW(decay_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                        fused=use_fused_adamw(o.fused, device_type))


def build_engine(cfg: Config, gcfg: GPTConfig, ds_config: dict, rank: int, device_type: str = "cpu"):
    """Returns (engine, model, optimizer). The model is built sharded under ZeRO-3."""
    import deepspeed

    stage3 = cfg.deepspeed.zero_stage == 3
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=stage3):
        model = GPT(gcfg)
    init_weights(model, cfg.trainer.seed, rank, stage3)
    optimizer = build_optimizer(cfg, model, device_type)
    # Saved into every checkpoint, this marks it convertible to DeepSpeed's
    # universal format (resharding to another number of ranks): without it
    # ds_to_universal refuses ZeRO-1/2 checkpoints.  megagpt has no tensor or
    # pipeline parallelism, so there are no patterns to declare.
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE

    model.universal_checkpoint_info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    # DeepSpeed's WarmupCosineLR starts at iteration -1, learning rate 0, and
    # the engine steps it after each optimizer step: step 1 would not learn at
    # all, and step k would run at the schedule's point k - 2.  One step here
    # puts step k at point k - 1: step 1 at lr / warmup_steps, the last step at
    # lr * min_lr_ratio.  (A resume loads the schedule's own state over this.)
    engine.lr_scheduler.step()
    if cfg.model.compile:
        engine.compile()
    return engine, model, optimizer


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
