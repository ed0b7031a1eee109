"""What `python -m megagpt.bench gpu` runs: its rows (megagpt's jobs and the
peers', each with its planned seconds) and the shapes they run at, a preset's
own on a GPU and tiny ones for `--cpu-smoke`."""

from __future__ import annotations

from dataclasses import dataclass, field

LLAMA_VOCAB, GPT2_VOCAB = 128256, 50304


@dataclass
class Row:
    label: str
    runner: str  # megagpt | transformers | torchtitan
    preset: str  # llama-1b | gpt2-124m
    overrides: list[str] = field(default_factory=list)  # megagpt.train overrides beyond the shape
    compile: bool = False  # peers: torch.compile
    est_s: float = 60.0  # wall seconds on an H100, start-up included: what the budget plans with
    quick: bool = False
    fp8: str | None = None  # the recipe a megagpt row asks for
    flash: bool = False  # needs FlashAttention
    save_every: int = 0  # megagpt: save asynchronously every this many steps (else never within the row)
    steps: int | None = None  # steps to log, where not the mode's
    loss_vs: str | None = None  # the label of a row whose losses this row's are compared with, step by step
    micro_batch: int | None = None  # megagpt: trainer.micro_batch_size, where not the mode's


ROWS = [
    # --quick: these, in this order (most telling first), each if its estimate still fits the budget.
    Row("llama-1b, megagpt defaults (ZeRO-3)", "megagpt", "llama-1b", [], est_s=100, quick=True),
    Row("llama-1b, transformers, compile", "transformers", "llama-1b", compile=True, est_s=80, quick=True),
    Row("gpt2-124m, megagpt defaults (ZeRO-3)", "megagpt", "gpt2-124m", [], est_s=60, quick=True),
    Row("gpt2-124m, megagpt, ZeRO-0", "megagpt", "gpt2-124m", ["deepspeed=zero0"], est_s=45, quick=True),
    Row("llama-1b, megagpt, ZeRO-0", "megagpt", "llama-1b", ["deepspeed=zero0"], est_s=80, quick=True),
    Row(
        "llama-1b, megagpt, fp8 tensorwise, ZeRO-0",
        "megagpt",
        "llama-1b",
        ["deepspeed=zero0", "model.fp8=tensorwise"],
        est_s=90,
        quick=True,
        fp8="tensorwise",
    ),
    # Start-up and trainer.async_save at llama-1b: each save's blocking time and its background commit.
    Row(
        "llama-1b, megagpt defaults, async save",
        "megagpt",
        "llama-1b",
        ["trainer.keep_last=1"],
        est_s=110,
        quick=True,
        save_every=12,
        steps=40,
    ),
    Row("llama-1b, torchtitan, flex", "torchtitan", "llama-1b", est_s=60, quick=True),
    Row("llama-1b, transformers, eager", "transformers", "llama-1b", est_s=35, quick=True),
    # The variants, one change at a time from megagpt's ZeRO-0 row.
    Row(
        "llama-1b, megagpt, ZeRO-0, no compile",
        "megagpt",
        "llama-1b",
        ["deepspeed=zero0", "model.compile=false"],
        est_s=60,
    ),
    Row(
        "llama-1b, megagpt, ZeRO-0, sdpa cudnn",
        "megagpt",
        "llama-1b",
        ["deepspeed=zero0", "model.attention=sdpa", "model.sdpa_backend=cudnn"],
        est_s=100,
    ),
    Row(
        "llama-1b, megagpt, ZeRO-0, sdpa flash",
        "megagpt",
        "llama-1b",
        ["deepspeed=zero0", "model.attention=sdpa", "model.sdpa_backend=flash"],
        est_s=100,
    ),
    Row(
        "llama-1b, megagpt, ZeRO-0, flash_attn",
        "megagpt",
        "llama-1b",
        ["deepspeed=zero0", "model.attention=flash_attn"],
        est_s=120,
        flash=True,
    ),
    Row(
        "llama-1b, megagpt, ZeRO-0, act. ckpt",
        "megagpt",
        "llama-1b",
        ["deepspeed=zero0", "model.activation_checkpointing=1"],
        est_s=100,
    ),
    Row(
        "llama-1b, megagpt, fp8 rowwise, ZeRO-0",
        "megagpt",
        "llama-1b",
        ["deepspeed=zero0", "model.fp8=rowwise"],
        est_s=110,
        fp8="rowwise",
    ),
    # float8 under the defaults' ZeRO-3: its gathered weights, and whether the speed-up holds there.
    Row(
        "llama-1b, megagpt defaults, fp8 tensorwise",
        "megagpt",
        "llama-1b",
        ["model.fp8=tensorwise"],
        est_s=110,
        fp8="tensorwise",
    ),
    Row(
        "gpt2-124m, megagpt, ZeRO-0, no compile",
        "megagpt",
        "gpt2-124m",
        ["deepspeed=zero0", "model.compile=false"],
        est_s=45,
    ),
    Row("llama-1b, torchtitan, flex, compile", "torchtitan", "llama-1b", compile=True, est_s=120),
    # float8's loss against bf16's over 300 steps (the same data, seed and schedule): target within 1%.
    Row("llama-1b, megagpt, ZeRO-0, 300 steps", "megagpt", "llama-1b", ["deepspeed=zero0"], est_s=150, steps=300),
    Row(
        "llama-1b, megagpt, fp8 tensorwise, ZeRO-0, 300 steps",
        "megagpt",
        "llama-1b",
        ["deepspeed=zero0", "model.fp8=tensorwise"],
        est_s=150,
        fp8="tensorwise",
        steps=300,
        loss_vs="llama-1b, megagpt, ZeRO-0, 300 steps",
    ),
    # The largest preset that trains on one GPU, and with which settings (an out-of-memory error is
    # the row's result): llama-3b as it comes and with activation checkpointing, llama-8b with both
    # and one sequence per step (ZeRO-3 holds 14 bytes per parameter on one GPU: 112 GB for 8B).
    Row("llama-3b, megagpt defaults", "megagpt", "llama-3b", [], est_s=150),
    Row(
        "llama-3b, megagpt defaults, act. ckpt", "megagpt", "llama-3b", ["model.activation_checkpointing=1"], est_s=150
    ),
    Row(
        "llama-8b, megagpt defaults, act. ckpt, micro-batch 1",
        "megagpt",
        "llama-8b",
        ["model.activation_checkpointing=1"],
        est_s=240,
        micro_batch=1,
    ),
    # ZeRO-3's settings, one at a time from the defaults (ZeRO-3): target ZeRO-3 >= 0.9x ZeRO-0.
    Row(
        "llama-1b, megagpt defaults, torch's F.linear",
        "megagpt",
        "llama-1b",
        ["deepspeed.stage3_memory_efficient_linear=false"],
        est_s=100,
    ),
    Row(
        "gpt2-124m, megagpt defaults, torch's F.linear",
        "megagpt",
        "gpt2-124m",
        ["deepspeed.stage3_memory_efficient_linear=false"],
        est_s=60,
    ),
    Row(
        "gpt2-124m, megagpt defaults, no leaf blocks",
        "megagpt",
        "gpt2-124m",
        ["deepspeed.stage3_leaf_blocks=false"],
        est_s=60,
    ),
]

# Tiny shapes for --cpu-smoke: the same rows and code paths, seconds each on 2 cores.
SMOKE_SHAPE = {
    "llama-1b": dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, mlp_hidden=128, vocab_size=4096),
    "gpt2-124m": dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=4, mlp_hidden=256, vocab_size=4096),
}
# The presets' shapes (conf/model/*.yaml): the peers' models, and the vocabulary of megagpt's rows.
PRESET_SHAPE = {
    "llama-1b": dict(n_layer=16, n_embd=2048, n_head=32, n_kv_head=8, mlp_hidden=8192, vocab_size=LLAMA_VOCAB),
    "gpt2-124m": dict(n_layer=12, n_embd=768, n_head=12, n_kv_head=12, mlp_hidden=3072, vocab_size=GPT2_VOCAB),
    "llama-3b": dict(n_layer=28, n_embd=3072, n_head=24, n_kv_head=8, mlp_hidden=8192, vocab_size=LLAMA_VOCAB),
    "llama-8b": dict(n_layer=32, n_embd=4096, n_head=32, n_kv_head=8, mlp_hidden=14336, vocab_size=LLAMA_VOCAB),
}


@dataclass
class Settings:
    mode: str  # quick | full | cpu-smoke
    steps: int
    warmup: int
    seq_len: int  # llama rows
    micro_batch: int
    gpt2_seq_len: int
    gpt2_micro_batch: int
    gpt2_grad_accum: int
    budget_s: float | None
    job_timeout_s: float | None

    def shape(self, preset: str) -> dict:
        """Model dims, sequence, micro-batch and grad accumulation of a preset's rows."""
        dims = SMOKE_SHAPE.get(preset, SMOKE_SHAPE["llama-1b"]) if self.mode == "cpu-smoke" else PRESET_SHAPE[preset]
        if preset == "gpt2-124m":
            return dict(
                dims,
                seq_len=self.gpt2_seq_len,
                micro_batch=self.gpt2_micro_batch,
                grad_accum=self.gpt2_grad_accum,
                family="gpt2",
            )
        return dict(dims, seq_len=self.seq_len, micro_batch=self.micro_batch, grad_accum=1, family="llama")


def settings_from(args) -> Settings:
    mode = "cpu-smoke" if args.cpu_smoke else "quick" if args.quick else "full"
    if mode == "cpu-smoke":
        return Settings(
            mode,
            steps=2,
            warmup=0,
            seq_len=32,
            micro_batch=2,
            gpt2_seq_len=32,
            gpt2_micro_batch=2,
            gpt2_grad_accum=2,
            budget_s=args.budget,
            job_timeout_s=args.job_timeout or 240,
        )
    steps = args.steps or (20 if mode == "quick" else 40)
    warmup = args.warmup if args.warmup is not None else (8 if mode == "quick" else 10)
    return Settings(
        mode,
        steps,
        warmup,
        args.seq_len,
        args.micro_batch,
        args.gpt2_seq_len,
        args.gpt2_micro_batch,
        args.gpt2_grad_accum,
        args.budget if args.budget is not None else (330 if mode == "quick" else None),
        args.job_timeout,
    )
