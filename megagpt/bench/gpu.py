"""`python -m megagpt.bench gpu`: tokens/s and MFU of real training jobs on
one CUDA GPU in bf16, for the gpt2-124m and llama-1b presets, with the
attention kernel, torch.compile and activation checkpointing varied one at a
time.

Each configuration is a `torchrun --nproc_per_node=1 -m megagpt.train` job
(DeepSpeed, bf16, the embedded corpus, logger=none); the figures are the
medians of tokens_per_sec and mfu in its metrics.jsonl after the warm-up
steps.  MFU uses megagpt's FLOPs per token (6N + 12 L H Q T) against the
device's dense bf16 peak from megagpt/flops.py.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

# (label, preset, overrides). Vocabulary: the published models' (the corpus's ids are a subset).
CONFIGS = [
    ("gpt2-124m, sdpa", "gpt2-124m", ["model.vocab_size=50304", "model.attention=sdpa"]),
    ("gpt2-124m, flash_attn", "gpt2-124m", ["model.vocab_size=50304", "model.attention=flash_attn"]),
    ("gpt2-124m, sdpa, compile", "gpt2-124m", ["model.vocab_size=50304", "model.attention=sdpa",
                                               "model.compile=true"]),
    ("llama-1b, sdpa", "llama-1b", ["model.vocab_size=128256", "model.attention=sdpa"]),
    ("llama-1b, flash_attn", "llama-1b", ["model.vocab_size=128256", "model.attention=flash_attn"]),
    ("llama-1b, sdpa, compile", "llama-1b", ["model.vocab_size=128256", "model.attention=sdpa",
                                             "model.compile=true"]),
    ("llama-1b, sdpa, act. ckpt", "llama-1b", ["model.vocab_size=128256", "model.attention=sdpa",
                                               "model.activation_checkpointing=1"]),
    ("llama-1b, sdpa, compile, act. ckpt", "llama-1b", ["model.vocab_size=128256", "model.attention=sdpa",
                                                        "model.compile=true", "model.activation_checkpointing=1"]),
]


def _run(label: str, preset: str, overrides: list[str], args, root: str) -> dict:
    run_dir = os.path.join(root, label.replace(", ", "_").replace(" ", "-").replace(".", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", "megagpt.train", f"model={preset}", f"run.dir={run_dir}", "logger=none",
           f"data.seq_len={args.seq_len}", f"trainer.micro_batch_size={args.micro_batch}",
           f"trainer.max_steps={args.steps}", "trainer.log_every=1", "trainer.eval_every=0",
           f"trainer.save_every={args.steps + 1}", "deepspeed=zero0", "deepspeed.precision=bf16", *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        return {"label": label, "error": (lines[-1] if lines else f"exit {r.returncode}")[:300]}
    recs = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))][args.warmup:]
    return {"label": label, "tokens_per_sec": statistics.median(x["tokens_per_sec"] for x in recs),
            "mfu": statistics.median(x["mfu"] for x in recs), "memory_gb": max(x["memory_gb"] for x in recs),
            "command": " ".join(cmd[1:])}


def bench_gpu(args) -> dict:
    import torch

    if not torch.cuda.is_available():
        print("megagpt.bench gpu: no CUDA device here; this benchmark needs one GPU (H100, H200, A100...)",
              file=sys.stderr)
        raise SystemExit(2)
    device = torch.cuda.get_device_name(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="megagpt-bench-gpu-") as root:
        for label, preset, overrides in CONFIGS:
            if args.only and not any(o in label for o in args.only):
                continue
            rows.append(_run(label, preset, overrides, args, root))
            r = rows[-1]
            if "error" in r:
                print(f"{label:<38} failed: {r['error']}", flush=True)
            else:
                print(f"{label:<38} {r['tokens_per_sec']:>12,.0f} tok/s  MFU {r['mfu']:6.1%}  "
                      f"{r['memory_gb']:6.1f} GiB", flush=True)
    print(f"device: {device}; bf16, seq {args.seq_len}, micro-batch {args.micro_batch}, "
          f"medians of steps {args.warmup + 1}..{args.steps}")
    return {"device": device, "seq_len": args.seq_len, "micro_batch": args.micro_batch, "rows": rows}


def add_parser(sub) -> None:
    p = sub.add_parser("gpu", help="tokens/s and MFU on one CUDA GPU (bf16)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10, help="logged steps left out of the medians")
    p.add_argument("--only", nargs="*", help="run only configurations whose label contains one of these")
    p.add_argument("--json", help="also write the figures to this file")
    p.set_defaults(run=bench_gpu)
