"""`python -m megagpt.bench scaling`: ZeRO-3 over 2 processes against ZeRO-0 over 2 and 1.

    python -m megagpt.bench scaling [--data DIR] [--seq-len 256] [--global-batch 16] [--micro-batch 8]
                                    [--steps 12] [--warmup 3] [--profile-steps 3] [--n-layer 4 --n-embd 128 ...]

Three real training jobs (`python -m torch.distributed.run --standalone
--nproc_per_node=N -m megagpt.train ...`), one after the other, with the same
model, sequence length and global batch (trainer.global_batch_size fixed; the
1-process job accumulates gradients over 2 micro-batches):

    ZeRO-0 x 1 process   (2 CPU threads: trainer.cpu_threads = cores / local ranks)
    ZeRO-0 x 2 processes (plain data parallel, gradients all-reduced; 1 thread each)
    ZeRO-3 x 2 processes (parameters gathered per layer, gradients reduce-scattered)

Each job logs every step (trainer.log_every=1): the figure quoted is the
median tokens/s over the steps after warm-up, leaving out the profiled steps
(torch.profiler slows them).  Profiled steps (trainer.profile_steps) give the
breakdown from the ranks' <run.dir>/profile/rank<R>.json: seconds per step of
compute, all-gather, reduce-scatter / all-reduce (gloo reduces ZeRO's
gradients with all-reduce), data wait and optimizer step.

MFU uses one peak for the whole machine, measured here once (fp32 matmul
throughput with all cores' threads), split evenly among the processes
(trainer.peak_flops = peak / N), so the three MFUs are fractions of the same
machine peak and compare directly.

Scaling efficiency = tokens/s of a 2-process job / (2 x tokens/s of the
1-process job).  On one machine the 2 processes share the cores the single
process already used (with 2 threads), so this is *not* the speed-up from
adding hardware: perfect is 0.5 here (same hardware, same work), and a
figure above 0.5 means 2 x 1-thread processes use the cores better than 1 x 2
threads.  The hardware-neutral ratio is `vs_1_process` = tokens/s (2 procs)
/ tokens/s (1 proc), printed beside it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SETUPS = (("zero0", 1), ("zero0", 2), ("zero3", 2))


def torchrun(module_args: list[str], nproc: int, log_path: str, timeout: float, threads: int) -> None:
    """Run `python -m torch.distributed.run --standalone --nproc_per_node=nproc -m ...`,
    output to log_path; raise with the log's tail if it fails."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
    env.update(
        {"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", "WANDB_MODE": "offline"}
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *module_args]
    with open(log_path, "wb") as out:
        try:
            r = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
            code = r.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    if code != 0:
        with open(log_path, errors="replace") as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}):\n{tail}")


def extensions_dir() -> str:
    """A torch_extensions cache of this Python environment's own.  DeepSpeed JIT-builds
    its CPU shm op at start; two environments sharing ~/.cache/torch_extensions
    rebuild it in turn (their build files differ), which costs minutes per job."""
    import hashlib

    tag = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    return os.path.join(os.path.expanduser("~"), ".cache", f"torch_extensions-{tag}")


def machine_peak_flops() -> float:
    """fp32 matmul FLOP/s of this machine: all cores' threads in one process."""
    import torch

    from megagpt.flops import measure_cpu_peak_flops

    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        return measure_cpu_peak_flops()
    finally:
        torch.set_num_threads(before)


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _model_overrides(args) -> list[str]:
    out = [f"model={args.model}"]
    for key in ("n_layer", "n_head", "n_embd"):
        value = getattr(args, key)
        if value is not None:
            out.append(f"model.{key}={value}")
    return out


def run_setup(args, stage: str, nproc: int, peak: float, root: str) -> dict:
    cores = os.cpu_count() or 1
    threads = max(1, cores // nproc)
    run_dir = os.path.join(root, f"{stage}-x{nproc}")
    profile_start = args.warmup
    max_steps = args.warmup + args.profile_steps + args.steps
    overrides = [
        "logger=none",
        f"deepspeed={stage}",
        f"run.dir={run_dir}",
        f"data.seq_len={args.seq_len}",
        f"trainer.max_steps={max_steps}",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        f"trainer.save_every={max_steps + 1}",  # the final checkpoint only, after the figures
        f"trainer.micro_batch_size={args.micro_batch}",
        f"trainer.global_batch_size={args.global_batch}",
        f"trainer.profile_steps={args.profile_steps}",
        f"trainer.profile_start={profile_start}",
        f"trainer.peak_flops={peak / nproc}",
        f"trainer.cpu_threads={threads}",
        *_model_overrides(args),
        *args.override,
    ]
    if args.data:
        overrides += ["data=webdataset", f"data.urls={args.data}"]
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    torchrun(["-m", "megagpt.train", *overrides], nproc, run_dir + ".log", args.timeout, threads)
    elapsed = time.perf_counter() - t0
    records = [r for r in _read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "tokens_per_sec" in r]
    profiled = range(profile_start + 1, profile_start + args.profile_steps + 1)
    timed = [r for r in records if r["step"] > args.warmup and r["step"] not in profiled]
    if not timed:
        raise RuntimeError(f"{stage} x {nproc}: no timed steps in {run_dir}/metrics.jsonl")
    profiles = {}
    for rank in range(nproc):
        path = os.path.join(run_dir, "profile", f"rank{rank}.json")
        if os.path.exists(path):
            with open(path) as f:
                profiles[rank] = json.load(f)
    return {
        "setup": f"ZeRO-{stage[-1]} x {nproc} proc" + ("s" if nproc > 1 else ""),
        "zero_stage": int(stage[-1]),
        "processes": nproc,
        "threads_per_process": threads,
        "grad_accum": args.global_batch // (args.micro_batch * nproc),
        "timed_steps": [r["step"] for r in timed],
        "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in timed),
        "step_time": statistics.median(r["step_time"] for r in timed),
        "mfu": statistics.median(r["mfu"] for r in timed),
        "memory_gb_rank0": max(r["memory_gb"] for r in records),
        "final_loss": records[-1]["loss"],
        "profile": profiles,
        "job_seconds": elapsed,
        "load_average_1min_before": load0,
        "load_average_1min_after": os.getloadavg()[0],
    }


def _breakdown(p: dict) -> dict:
    return {
        "compute": p["compute"],
        "all_gather": p["all_gather"],
        "reduce": p["reduce_scatter"] + p["all_reduce"],
        "data_wait": p["data_wait"],
        "optimizer": p["optimizer_step"],
        "wall": p["wall_per_step"],
    }


def bench_scaling(args) -> dict:
    if args.global_batch % (2 * args.micro_batch):
        raise SystemExit("--global-batch must be a multiple of 2 x --micro-batch")
    peak = args.peak_flops or machine_peak_flops()
    load = os.getloadavg()
    root = args.out or tempfile.mkdtemp(prefix="megagpt-scaling-")
    os.makedirs(root, exist_ok=True)
    rows = []
    for stage, nproc in SETUPS:
        rows.append(run_setup(args, stage, nproc, peak, root))
        print(
            f"  {rows[-1]['setup']}: {rows[-1]['tokens_per_sec']:,.0f} tokens/s ({rows[-1]['job_seconds']:.0f} s job)",
            flush=True,
        )
    base = rows[0]["tokens_per_sec"]
    for row in rows:
        row["vs_1_process"] = row["tokens_per_sec"] / base
        row["scaling_efficiency"] = row["tokens_per_sec"] / (row["processes"] * base)
        row["breakdown"] = {f"rank{r}": _breakdown(p) for r, p in row["profile"].items()}
    result = {
        "model": _model_overrides(args),
        "seq_len": args.seq_len,
        "global_batch": args.global_batch,
        "micro_batch": args.micro_batch,
        "steps_timed": args.steps,
        "warmup": args.warmup,
        "profile_steps": args.profile_steps,
        "cores": os.cpu_count(),
        "machine_peak_flops": peak,
        "load_average_before": list(load),
        "load_average_after": list(os.getloadavg()),
        "run_root": root,
        "rows": rows,
        "efficiency_note": (
            "efficiency = tok/s(2 procs) / (2 x tok/s(1 proc)); the 1-process job already "
            "uses every core (cores/1 threads), so 0.5 means the same throughput on the same "
            "cores; vs_1_process is the plain ratio"
        ),
    }
    print(
        f"model {' '.join(result['model'])}, seq_len {args.seq_len}, global batch {args.global_batch} "
        f"(micro-batch {args.micro_batch}); {os.cpu_count()} cores, machine fp32 peak "
        f"{peak / 1e9:.1f} GFLOP/s; medians over {args.steps} steps after {args.warmup} warm-up; "
        f"load average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print(
        f"{'setup':<18} {'thr':>3} {'tokens/s':>9} {'MFU':>6} {'vs 1p':>6} {'effic.':>6} {'step s':>7} | "
        f"{'rank0, profiled (s/step):':<25} {'wall':>6} {'compute':>7} {'all_gath':>8} {'reduce':>7} "
        f"{'data':>6} {'optim':>6}"
    )
    for row in rows:
        b = row["breakdown"].get("rank0")
        tail = (
            (
                f"{'':<25} {b['wall']:>6.3f} {b['compute']:>7.3f} {b['all_gather']:>8.3f} {b['reduce']:>7.3f} "
                f"{b['data_wait']:>6.3f} {b['optimizer']:>6.3f}"
            )
            if b
            else "(no profile)"
        )
        print(
            f"{row['setup']:<18} {row['threads_per_process']:>3} {row['tokens_per_sec']:>9,.0f} "
            f"{row['mfu'] * 100:>5.1f}% {row['vs_1_process']:>6.2f} {row['scaling_efficiency']:>6.2f} "
            f"{row['step_time']:>7.3f} | {tail}"
        )
    print(
        "efficiency = tok/s / (processes x tok/s of 1 process). The 1-process job uses both cores "
        "(2 threads), so 2 processes add no hardware: 0.5 is parity; vs 1p is the plain ratio. "
        "reduce = reduce_scatter + all_reduce (gloo reduces ZeRO gradients with all_reduce). "
        "The breakdown is of the profiled steps (torch.profiler on: slower than the timed ones)."
    )
    print(
        "load average (1 min) before/after each job: "
        + ", ".join(
            f"{r['setup']} {r['load_average_1min_before']:.2f}/{r['load_average_1min_after']:.2f}" for r in rows
        )
    )
    return result


def add_parser(sub) -> None:
    s = sub.add_parser("scaling", help="ZeRO-3 vs ZeRO-0 over 2 processes vs 1 process")
    s.add_argument("--data", help="prepared dataset dir (default: the embedded corpus)")
    s.add_argument("--model", default="tiny", help="model preset (conf/model)")
    s.add_argument("--n-layer", dest="n_layer", type=int)
    s.add_argument("--n-head", dest="n_head", type=int)
    s.add_argument("--n-embd", dest="n_embd", type=int)
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--global-batch", type=int, default=16, help="sequences per optimizer step, every setup")
    s.add_argument("--micro-batch", type=int, default=8, help="sequences per rank per forward")
    s.add_argument("--steps", type=int, default=12, help="timed steps (the median is over these)")
    s.add_argument("--warmup", type=int, default=3, help="steps left out before the profiled and timed ones")
    s.add_argument("--profile-steps", type=int, default=3, help="profiled steps (after warm-up, not timed)")
    s.add_argument("--peak-flops", type=float, help="machine peak FLOP/s for MFU (default: measured)")
    s.add_argument("--override", action="append", default=[], help="extra key=value for megagpt.train")
    s.add_argument("--out", help="keep the runs here (default: a new temp dir)")
    s.add_argument("--timeout", type=float, default=1200, help="seconds per job")
    s.add_argument("--json", help="also write the figures to this file")
    s.set_defaults(run=bench_scaling)
