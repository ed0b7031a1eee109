"""`python -m megagpt.bench cost`: step time and memory against model width and sequence length (CPU).

    python -m megagpt.bench cost [--widths 128 256 512] [--seq-lens 256 512 1024] [--n-layer 4]
                                 [--micro-batch 4] [--steps 3]

One process, all cores' threads, fp32: megagpt's GPT model (the gpt2 family,
n_layer blocks, 4 heads, the embedded corpus's vocabulary of 4096) trained
with torch.optim.AdamW on random tokens -- forward, backward, optimizer step,
as one rank of megagpt.train does it without DeepSpeed around it.  Each
(width, seq len) point runs in a fresh subprocess so that its peak RSS
(resource.getrusage ru_maxrss) is its own; `above base` is the peak minus the
RSS after imports and before the model is built (parameters, gradients,
AdamW state, activations, allocator slack).  Step time is the median over
--steps steps after one warm-up step; the micro-batch is fixed, so tokens per
step grow with the sequence length.  MFU is against this machine's fp32
matmul peak measured here (megagpt.flops).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MB = 2**20


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def count_params(model) -> tuple[int, int]:
    """(all parameters, those in matmuls: N of megagpt.flops, as megagpt.train counts them)."""
    total, matmul, seen = 0, 0, set()
    skip = ("wpe.",) if model.cfg.tie_embeddings else ("wpe.", "wte.")
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if not name.startswith(skip):
            matmul += p.numel()
    return total, matmul


def worker(argv: list[str]) -> None:
    """One (width, seq len) point: prints one JSON line."""
    p = argparse.ArgumentParser(prog="python -m megagpt.bench.cost --worker")
    for key in ("--n-embd", "--seq-len", "--n-layer", "--n-head", "--vocab", "--micro-batch", "--steps", "--threads"):
        p.add_argument(key, type=int, required=True)
    a = p.parse_args(argv)
    import torch

    from megagpt.config import ModelConfig
    from megagpt.flops import flops_per_token
    from megagpt.model.attention import resolve_backend
    from megagpt.model.gpt import GPT, GPTConfig

    torch.set_num_threads(a.threads)
    base = _rss_now()
    cfg = GPTConfig.from_settings(
        ModelConfig(n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd),
        vocab_size=a.vocab,
        seq_len=a.seq_len,
        attention=resolve_backend("auto", "cpu"),
    )
    model = GPT(cfg)
    model.init_weights(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(a.steps + 1):
        x = torch.randint(0, cfg.vocab_size, (a.micro_batch, a.seq_len + 1), generator=gen)
        t0 = time.perf_counter()
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    n_total, n_matmul = count_params(model)
    step = statistics.median(times[1:])
    tokens = a.micro_batch * a.seq_len
    print(
        json.dumps(
            {
                "n_embd": a.n_embd,
                "seq_len": a.seq_len,
                "n_layer": a.n_layer,
                "n_head": a.n_head,
                "micro_batch": a.micro_batch,
                "threads": a.threads,
                "n_params": n_total,
                "n_params_matmul": n_matmul,
                "step_time": step,
                "step_times": times[1:],
                "warmup_step_time": times[0],
                "tokens_per_step": tokens,
                "tokens_per_sec": tokens / step,
                "flops_per_step": flops_per_token(n_matmul, a.n_layer, a.n_head, cfg.head_dim, a.seq_len) * tokens,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "rss_baseline_bytes": base,
                "model_state_bytes": 16 * n_total,  # fp32 params + grads + AdamW exp_avg + exp_avg_sq
            }
        ),
        flush=True,
    )


def bench_cost(args) -> dict:
    from megagpt.bench.scaling import machine_peak_flops

    threads = args.threads or os.cpu_count() or 1
    peak = args.peak_flops or machine_peak_flops()
    load = os.getloadavg()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    rows = []
    for width in args.widths:
        for seq in args.seq_lens:
            cmd = [
                sys.executable,
                "-m",
                "megagpt.bench.cost",
                "--worker",
                f"--n-embd={width}",
                f"--seq-len={seq}",
                f"--n-layer={args.n_layer}",
                f"--n-head={args.n_head}",
                f"--vocab={args.vocab}",
                f"--micro-batch={args.micro_batch}",
                f"--steps={args.steps}",
                f"--threads={threads}",
            ]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
            row = json.loads(r.stdout.strip().splitlines()[-1])
            row["mfu"] = row["flops_per_step"] / row["step_time"] / peak
            row["peak_rss_above_baseline_bytes"] = row["peak_rss_bytes"] - row["rss_baseline_bytes"]
            rows.append(row)
            print(f"  width {width}, seq {seq}: {row['step_time']:.3f} s/step", flush=True)
    base_w, base_t = args.widths[0], args.seq_lens[0]
    ref = {(r["n_embd"], r["seq_len"]): r for r in rows}
    for row in rows:
        same_seq = ref[(base_w, row["seq_len"])]
        same_width = ref[(row["n_embd"], base_t)]
        row["step_time_vs_smallest_width"] = row["step_time"] / same_seq["step_time"]
        row["step_time_vs_shortest_seq"] = row["step_time"] / same_width["step_time"]
    result = {
        "n_layer": args.n_layer,
        "n_head": args.n_head,
        "vocab": args.vocab,
        "micro_batch": args.micro_batch,
        "steps": args.steps,
        "threads": threads,
        "cores": os.cpu_count(),
        "machine_peak_flops": peak,
        "load_average_before": list(load),
        "load_average_after": list(os.getloadavg()),
        "rows": rows,
    }
    print(
        f"one process, {threads} threads, fp32, AdamW; {args.n_layer} layers, {args.n_head} heads, vocab "
        f"{args.vocab}, micro-batch {args.micro_batch}; median of {args.steps} steps after 1 warm-up; machine "
        f"fp32 peak {peak / 1e9:.1f} GFLOP/s; load average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print(
        f"{'width':>5} {'params':>7} {'seq':>5} {'step s':>7} {'x width':>7} {'x seq':>6} {'tokens/s':>9} "
        f"{'MFU':>6} {'peak RSS MB':>11} {'above base':>10} {'16 B/param MB':>13}"
    )
    for row in rows:
        print(
            f"{row['n_embd']:>5} {row['n_params'] / 1e6:>6.2f}M {row['seq_len']:>5} {row['step_time']:>7.3f} "
            f"{row['step_time_vs_smallest_width']:>7.2f} {row['step_time_vs_shortest_seq']:>6.2f} "
            f"{row['tokens_per_sec']:>9,.0f} {row['mfu'] * 100:>5.1f}% {row['peak_rss_bytes'] / MB:>11,.0f} "
            f"{row['peak_rss_above_baseline_bytes'] / MB:>10,.0f} {row['model_state_bytes'] / MB:>13,.1f}"
        )
    print(
        f"x width: step time / that of width {base_w} at the same seq len; x seq: / that of seq len {base_t} at "
        "the same width (tokens per step grow with seq len: fixed micro-batch)"
    )
    return result


def add_parser(sub) -> None:
    c = sub.add_parser("cost", help="step time and memory against model width and sequence length (CPU)")
    c.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512])
    c.add_argument("--seq-lens", type=int, nargs="+", default=[256, 512, 1024])
    c.add_argument("--n-layer", type=int, default=4)
    c.add_argument("--n-head", type=int, default=4)
    c.add_argument("--vocab", type=int, default=4096)
    c.add_argument("--micro-batch", type=int, default=4)
    c.add_argument("--steps", type=int, default=3, help="timed steps per point (after 1 warm-up)")
    c.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    c.add_argument("--peak-flops", type=float, help="machine peak FLOP/s for MFU (default: measured)")
    c.add_argument("--timeout", type=float, default=900, help="seconds per point")
    c.add_argument("--json", help="also write the figures to this file")
    c.set_defaults(run=bench_cost)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        sys.exit("usage: python -m megagpt.bench cost ... (--worker is for the subprocesses it starts)")
