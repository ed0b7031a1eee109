"""`python -m megagpt.bench gpu`: tokens/s, MFU and peak memory of real training
jobs on one CUDA GPU in bf16, megagpt beside its peers measured in the same run.

Rows (`--quick` runs the first nine, in this order, within `--budget` seconds;
the ones the budget leaves out say so, and `--only` runs them in another call):
  llama-1b, megagpt defaults (ZeRO-3)        `model=llama-1b`, no performance flags
  llama-1b, transformers, compile            LlamaForCausalLM at the same shape, run as HF
                                             Trainer runs it: fp32 weights, bf16 autocast,
                                             fused AdamW, grad clipping; torch_compile
  gpt2-124m, megagpt defaults (ZeRO-3)       llm.c's setting: 64 x 1024 tokens per step
  gpt2-124m, megagpt, ZeRO-0                 (micro-batch 16 x grad accum 4)
  llama-1b, megagpt, ZeRO-0
  llama-1b, megagpt, fp8 tensorwise, ZeRO-0  torchao float8 (model.fp8), where it imports
  llama-1b, megagpt defaults, async save     trainer.async_save every 12 steps: the seconds
                                             training waited at each save, the commit's
                                             write and sha256 times (its log lines)
  llama-1b, torchtitan, flex                 torchtitan 0.3.0's Llama3 "1B" (FlexAttention),
                                             where it imports (else its import error)
  llama-1b, transformers, eager              the same peer, not compiled
and, without --quick, variants: no compile, SDPA's kernels, FlashAttention,
activation checkpointing, fp8 rowwise, fp8 under ZeRO-3, torchtitan compiled, float8 against bf16
over 300 steps (`--only "300 steps"`: the losses compared step by step,
`loss_vs` in the JSON), the larger presets (`--only llama-3b llama-8b`: which
one trains on this GPU, and how), and ZeRO-3's settings (torch's F.linear, no
leaf blocks).

megagpt rows are `torchrun --nproc_per_node=1 -m megagpt.train` jobs (the
embedded corpus, logger=none), stopped once `--steps` steps are logged (no
end-of-run checkpoint); peers run in a child process each (megagpt/bench/peer.py:
a small train loop written here, random tokens).  The rows and their shapes are
in megagpt/bench/gpu_rows.py, the process plumbing in jobs.py.  Figures: medians over the steps after
`--warmup`; megagpt rows also give the seconds from launch to step 1's record
(`first_step_s`; the embedded corpus is prepared before the first row, once:
`corpus_prepare_s`); MFU by megagpt's FLOPs per token (6N + 12 L H Q T, flops.py) against
the device's dense bf16 peak, for every row alike.  Each job has its own
timeout; a row whose estimated time no longer fits the budget is skipped and
says so; the JSON (`--json`, rewritten after every row) lists every row with
its status.  `--cpu-smoke` runs the same rows on CPU at tiny shapes, 2 steps
each (rows that need CUDA, torchao or torchtitan say "skipped: ..."):
tests/test_bench_gpu.py.

On a lent GPU machine (../shared/notes/gpu-machine.md), prepare the wheels here
first, from the repository root: `bash launch/gpu-wheels.sh` (add `--fa4` for
FlashAttention 4, which then takes a first call that only copies `.fa4/a` to the
machine: see the script).  Then give the device tool `carry: [".whl"]` (with
FlashAttention 4: `[".whl", ".fa4/b"]`), `timeout_s: 480` and the command below
(one line; about 7.5 minutes: the bench's 330 s budget, then the GPU tests; every
job's output in $OUT/log.txt, the figures in $OUT/bench.json):

DEVICE COMMAND:
L=$OUT/log.txt; python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >>$L 2>&1; if [ -d .fa4/b ]; then mkdir -p /tmp/fa4w && cat /tmp/fa4/fa4.tar.part-* .fa4/b/fa4.tar.part-* | tar xf - -C /tmp/fa4w && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/fa4w/wheels/*.whl >>$L 2>&1; echo "fa4 install: $?" >>$L; PYTHONPATH=/tmp/site python3 -c 'import flash_attn.cute' >>$L 2>&1; echo "fa4 import: $?" >>$L; fi; export PYTHONPATH=/tmp/site:$PWD MEGAGPT_CACHE=/tmp/mgcache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false; nvidia-smi >>$L 2>&1; python3 -c 'import torch,transformers;print(torch.__version__,transformers.__version__)' >>$L 2>&1; timeout 355 python3 -m megagpt.bench gpu --quick --budget 330 --json $OUT/bench.json --log $L 2>&1 | tail -30; echo '== pytest -m gpu' >>$L; P="python3 -m pytest -m gpu -q -rfEs --durations=5 -p no:cacheprovider"; timeout -s INT 25 $P tests/test_staged_save.py >>$L 2>&1; timeout -s INT 75 $P --continue-on-collection-errors --ignore=tests/test_staged_save.py tests >>$L 2>&1; tail -4 $L

With FlashAttention 4 installed (launch/gpu-wheels.sh --fa4) the defaults row uses
it (model.attention=auto) and the flash_attn rows run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

from megagpt.bench import jobs
from megagpt.bench.gpu_rows import ROWS, Row, Settings, settings_from

# The one-line command for the device tool, as the docstring gives it.
DEVICE_COMMAND = (__doc__ or "DEVICE COMMAND:\n\n").split("DEVICE COMMAND:\n", 1)[1].split("\n", 1)[0]
# What megagpt.train prints that a row keeps: the attention backend, SDPA's kernel, float8.
KEPT_LINES = re.compile(
    r"^(attention:|sdpa kernel:|fp8:|compile|model:|saved checkpoint)"
    r"|checkpoint step_\d+(\.partial)?( committed|: staged)"
)
SAVE_WAITED = re.compile(r"^saved checkpoint \S*step_(\d+): training waited ([0-9.]+) s(?:, ([0-9.]+) s of it for)?")


# --- what a row needs ---------------------------------------------------------------------


def gpu_facts() -> tuple[str, tuple[int, int]] | None:
    """(name, compute capability) of GPU 0, or None.  From nvidia-smi, so that
    this process holds no CUDA context (and its memory) while the jobs run."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        name, cap = [x.strip() for x in out.splitlines()[0].rsplit(",", 1)]
        major, minor = cap.split(".")
        return name, (int(major), int(minor))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        import torch

        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)


def _flash_here() -> str | None:
    """Why FlashAttention cannot run here (asked in a child process, which
    imports it and initialises CUDA), or None."""
    code = (
        "from megagpt.model import attention as a; import sys; "
        "sys.stdout.write('' if a.flash_attn_available() else a.flash_unavailable_reason())"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        return f"the check failed: {jobs.last_line(r.stderr)}"
    return r.stdout.strip() or None


def skip_reason(row: Row, s: Settings) -> str | None:
    """Why this row cannot run here (checked before starting it), or None.
    torchtitan's import is tried in its own process (its error is the row's)."""
    if s.mode == "cpu-smoke":
        if row.fp8:
            from megagpt.model.float8 import torchao_problem

            return (
                f"skipped: model.fp8 needs a CUDA GPU (compute capability >= 8.9); torchao: "
                f"{torchao_problem() or 'imports'}"
            )
        if row.flash:
            return "skipped: FlashAttention needs a CUDA GPU"
        if row.overrides and any(o.startswith("model.sdpa_backend=") for o in row.overrides):
            return "skipped: model.sdpa_backend selects a CUDA kernel"
        return None
    if row.fp8:
        from megagpt.model.float8 import fp8_support_problem, torchao_problem

        facts = gpu_facts()
        problem = fp8_support_problem(row.fp8, torchao_problem(), facts and facts[1], facts[0] if facts else "")
        if problem:
            return f"skipped: model.fp8: {problem}"
    if row.flash:
        problem = _flash_here()
        if problem:
            return f"skipped: no FlashAttention here ({problem})"
    return None


# --- megagpt rows: megagpt.train jobs ---------------------------------------------------------


def save_every_of(row: Row, s: Settings) -> int:
    return min(row.save_every, 2) if s.mode == "cpu-smoke" else row.save_every


def steps_of(row: Row, s: Settings) -> int:
    """Steps the row logs: cpu-smoke's 2, or for a saving row two saves and a step."""
    if s.mode == "cpu-smoke":
        return 2 * save_every_of(row, s) + 1 if row.save_every else s.steps
    return row.steps or s.steps


def megagpt_command(row: Row, s: Settings, run_dir: str) -> list[str]:
    sh = s.shape(row.preset)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        "-m",
        "megagpt.train",
        f"model={row.preset}",
        f"run.dir={run_dir}",
        "logger=none",
        f"data.seq_len={sh['seq_len']}",
        f"trainer.micro_batch_size={row.micro_batch or sh['micro_batch']}",
        f"trainer.grad_accum={sh['grad_accum']}",
        f"model.vocab_size={sh['vocab_size']}",
        # Far beyond the steps measured: the job is stopped before any checkpoint or the end of run.
        f"trainer.max_steps={steps_of(row, s) + 1000}",
        "trainer.log_every=1",
        "trainer.eval_every=0",
    ]
    cmd += (
        [f"trainer.save_every={save_every_of(row, s)}", "trainer.async_save=true"]
        if row.save_every
        else [f"trainer.save_every={steps_of(row, s) + 2000}"]
    )
    if s.mode == "cpu-smoke":
        cmd += [f"model.{k}={sh[k]}" for k in ("n_layer", "n_embd", "n_head", "n_kv_head", "mlp_hidden")]
    return cmd + row.overrides


def run_megagpt(row: Row, s: Settings, root: str, timeout: float) -> dict:
    run_dir = os.path.join(root, jobs.slug(row.label))
    log_path = run_dir + ".log"
    cmd = megagpt_command(row, s, run_dir)
    out = {"command": " ".join(cmd[1:])}
    steps = steps_of(row, s)
    proc = jobs.spawn(cmd, log_path)
    t0, recs = time.monotonic(), []
    try:
        while True:
            recs = jobs.records(os.path.join(run_dir, "metrics.jsonl"))
            if recs and "first_step_s" not in out:  # launch to step 1's record, within the 0.25 s poll
                out["first_step_s"] = round(time.monotonic() - t0, 2)
            if len(recs) >= steps or proc.poll() is not None:
                break
            if time.monotonic() - t0 > timeout:
                out.update(
                    status="timeout", reason=f"timeout after {timeout:.0f} s with {len(recs)} of {steps} steps logged"
                )
                break
            time.sleep(0.25)
    finally:
        jobs.stop(proc)
    recs = jobs.records(os.path.join(run_dir, "metrics.jsonl"))[:steps]
    out["log_lines"] = [x.strip() for x in open(log_path, errors="replace") if KEPT_LINES.search(x.strip())]
    out["log_path"] = log_path
    if row.save_every:  # seconds training waited at each save (the first one allocates the host buffers)
        saves = [m for m in map(SAVE_WAITED.match, out["log_lines"]) if m and int(m.group(1)) <= steps]
        out["save_waited_s"] = [float(m.group(2)) for m in saves]  # the job may go on a little before it is stopped
        out["save_waited_for_previous_s"] = [float(m.group(3) or 0) for m in saves]  # its commit still running
    if "status" not in out and len(recs) < steps:
        out.update(status="error", reason=f"exit {proc.returncode} after {len(recs)} steps: {jobs.log_tail(log_path)}")
    out["losses"] = [r["loss"] for r in recs]
    if len(recs) > s.warmup:
        measured = recs[s.warmup :]
        out.update(
            tokens_per_sec=statistics.median(r["tokens_per_sec"] for r in measured),
            mfu=statistics.median(r["mfu"] for r in measured),
            memory_gb=max(r["memory_gb"] for r in measured),
            step_time=statistics.median(r["step_time"] for r in measured),
            data_wait=statistics.median(r.get("data_wait", 0.0) for r in measured),
            steps_measured=len(measured),
        )
        out.setdefault("status", "ok")
    if row.fp8 and out.get("status") == "ok" and not any(x.startswith("fp8:") for x in out["log_lines"]):
        out["note"] = (
            "the job printed no 'fp8:' line: model.fp8 may not be wired into the engine yet (these figures may be bf16)"
        )
    return out


def loss_agreement(losses: list[float], reference: list[float], window: int = 10) -> dict:
    """How close a run's losses stay to a reference run's over the same steps:
    the largest relative difference of their `window`-step moving means (from
    step `window` on: single steps are noisy), and that of their means over the
    last 50 steps."""
    n = min(len(losses), len(reference))
    if n < window:
        return {"steps": n}
    moving = [
        abs(sum(losses[i - window : i]) - sum(reference[i - window : i])) / abs(sum(reference[i - window : i]))
        for i in range(window, n + 1)
    ]
    tail = min(50, n)
    final = abs(sum(losses[n - tail : n]) - sum(reference[n - tail : n])) / abs(sum(reference[n - tail : n]))
    return {"steps": n, "max_rel_diff_moving": max(moving), "window": window, "rel_diff_last_50": final}


# --- peers: megagpt.bench.peer, in a child process -------------------------------------------


def peer_spec(row: Row, s: Settings) -> dict:
    return {
        "runner": row.runner,
        "compile": row.compile,
        "steps": s.steps,
        "warmup": s.warmup,
        "shape": s.shape(row.preset),
        "smoke": s.mode == "cpu-smoke",
    }


def run_peer(row: Row, s: Settings, root: str, timeout: float) -> dict:
    log_path = os.path.join(root, jobs.slug(row.label) + ".log")
    cmd = [sys.executable, "-m", "megagpt.bench.peer", json.dumps(peer_spec(row, s))]
    out = {"log_path": log_path, "command": f"-m megagpt.bench.peer '{cmd[-1]}'"}
    proc = jobs.spawn(cmd, log_path)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(out, status="timeout", reason=f"timeout after {timeout:.0f} s")
    finally:
        jobs.stop(proc)
    result = jobs.result_in(open(log_path, errors="replace").read())
    if result is None:
        return dict(out, status="error", reason=f"exit {proc.returncode}: {jobs.log_tail(log_path)}")
    return dict(result, **out)


# --- the table --------------------------------------------------------------------------------


def pace(done: list[dict]) -> float:
    """How the rows run so far compare with their estimates (wall / est, the
    median, within 0.5..2): the remaining estimates are scaled by it."""
    ratios = [r["wall_s"] / r["planned_s"] for r in done if r.get("status") == "ok" and r.get("planned_s")]
    return min(2.0, max(0.5, statistics.median(ratios))) if ratios else 1.0


def _device_name() -> str:
    import torch

    facts = gpu_facts() if torch.cuda.is_available() else None
    return facts[0] if facts else "cpu"


def _print_row(r: dict) -> None:
    if r["status"] == "ok":
        extra = f"  first step at {r['first_step_s']:.0f} s" if "first_step_s" in r else ""
        if "save_waited_s" in r:
            extra += (
                "  saves waited "
                + ", ".join(
                    f"{x:.2f} ({p:.2f} for the previous)"
                    for x, p in zip(r["save_waited_s"], r["save_waited_for_previous_s"])
                )
                + " s"
            )
        print(
            f"{r['label']:<44} {r['tokens_per_sec']:>12,.0f} tok/s  MFU {r['mfu']:6.1%}  "
            f"{r['memory_gb']:6.1f} GiB  ({r['wall_s']:.0f} s){extra}"
            + (f"  NOTE: {r['note']}" if r.get("note") else ""),
            flush=True,
        )
    else:
        reason = r.get("reason", "")
        print(
            f"{r['label']:<44} {reason if reason.startswith(r['status']) else r['status'] + ': ' + reason}", flush=True
        )


def _append_log(path: str | None, header: str, job_log: str | None) -> None:
    if not path:
        return
    with open(path, "a") as f:
        f.write(f"\n===== {header}\n")
        if job_log and os.path.exists(job_log):
            with open(job_log, errors="replace") as j:
                f.write(j.read()[-200_000:])


def bench_gpu(args) -> dict:
    import torch

    s = settings_from(args)
    if s.mode != "cpu-smoke" and not torch.cuda.is_available():
        print(
            "megagpt.bench gpu: no CUDA device here; this benchmark needs one GPU (H100, H200, A100...); "
            "--cpu-smoke runs its code paths on CPU",
            file=sys.stderr,
        )
        raise SystemExit(2)
    rows = [r for r in ROWS if (r.quick or s.mode == "full")]
    if args.only:
        rows = [r for r in rows if any(o in r.label for o in args.only)]
    start = time.monotonic()
    deadline = start + s.budget_s if s.budget_s else None
    result = {"mode": s.mode, "device": _device_name(), "torch": torch.__version__, "settings": asdict(s), "rows": []}
    if s.mode != "cpu-smoke":
        result["note"] = (
            f"bf16; llama rows seq {s.seq_len} x micro-batch {s.micro_batch}; gpt2 rows seq "
            f"{s.gpt2_seq_len} x {s.gpt2_micro_batch} x grad accum {s.gpt2_grad_accum}; medians of "
            f"steps {s.warmup + 1}..{s.steps}"
        )

    if any(r.runner == "megagpt" for r in rows):
        # The embedded corpus is prepared once per machine (cached): here, so that no row's
        # first_step_s includes it.
        from megagpt.config import DataConfig
        from megagpt.data.embedded import ensure_embedded
        from megagpt.data.source import default_cache_dir

        t0, d = time.monotonic(), DataConfig()
        ensure_embedded(default_cache_dir(), vocab_size=d.embedded_vocab_size, max_bytes=d.embedded_max_bytes, log=None)
        result["corpus_prepare_s"] = round(time.monotonic() - t0, 1)

    def write():
        result["elapsed_s"] = round(time.monotonic() - start, 1)
        result["skipped"] = [f"{r['label']}: {r.get('reason', '')}" for r in result["rows"] if r["status"] != "ok"]
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    def on_term(signum, frame):  # `timeout` sends SIGTERM: stop the job, keep what was measured
        if jobs.current:
            proc, log_path = jobs.current
            jobs.kill_tree(proc)
            _append_log(args.log, f"(interrupted by signal {signum}) {' '.join(proc.args[1:])[:300]}", log_path)
        result["rows"].append({"label": "(interrupted)", "status": "interrupted", "reason": f"signal {signum}"})
        write()
        raise SystemExit(124)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        with tempfile.TemporaryDirectory(prefix="megagpt-bench-gpu-") as root:
            for row in rows:
                est = row.est_s * pace(result["rows"])
                r = {
                    "label": row.label,
                    "runner": row.runner,
                    "preset": row.preset,
                    "planned_s": row.est_s,
                    "est_s": round(est),
                }
                left = (deadline - time.monotonic()) if deadline else None
                reason = skip_reason(row, s)
                if reason is None and left is not None and left < est:
                    reason = f"skipped: out of budget (needs ~{est:.0f} s, {max(0.0, left):.0f} s left)"
                if reason:
                    r.update(status="skipped", reason=reason)
                else:
                    timeout = min(
                        x for x in (left, s.job_timeout_s, 3 * est if s.mode != "cpu-smoke" else None) if x is not None
                    )
                    t0 = time.monotonic()
                    run = run_megagpt if row.runner == "megagpt" else run_peer
                    r.update(run(row, s, root, timeout))
                    r["wall_s"] = round(time.monotonic() - t0, 1)
                    _append_log(args.log, f"{row.label}: {r['status']} {r.get('reason', '')}", r.pop("log_path", None))
                result["rows"].append(r)
                _print_row(r)
                write()
    finally:
        signal.signal(signal.SIGTERM, previous)
    by_label = {r["label"]: r for r in result["rows"]}
    for row in rows:
        mine, ref = by_label.get(row.label), by_label.get(row.loss_vs or "")
        if mine and ref and mine.get("losses") and ref.get("losses"):
            mine["loss_vs"] = dict(loss_agreement(mine["losses"], ref["losses"]), reference=row.loss_vs)
            a = mine["loss_vs"]
            if "max_rel_diff_moving" in a:
                print(
                    f"{row.label}: loss vs {row.loss_vs} over {a['steps']} steps: at most "
                    f"{a['max_rel_diff_moving']:.2%} apart ({a['window']}-step means), "
                    f"{a['rel_diff_last_50']:.2%} over the last 50",
                    flush=True,
                )
    write()
    skipped = [r for r in result["rows"] if r["status"] != "ok"]
    print(
        f"device: {result['device']}; {result.get('note', s.mode)}; {len(result['rows']) - len(skipped)} rows "
        f"measured, {len(skipped)} not, in {result['elapsed_s']:.0f} s"
    )
    return result


def add_parser(sub) -> None:
    p = sub.add_parser("gpu", help="tokens/s and MFU on one CUDA GPU (bf16), beside transformers and torchtitan")
    p.add_argument("--quick", action="store_true", help="the nine main rows within --budget (one device call)")
    p.add_argument("--cpu-smoke", action="store_true", help="the quick rows on CPU at tiny shapes, 2 steps each")
    p.add_argument(
        "--budget", type=float, help="seconds for all rows (quick: 330); rows that no longer fit are skipped"
    )
    p.add_argument("--job-timeout", type=float, help="seconds per job (default: 3 x its estimate)")
    p.add_argument("--seq-len", type=int, default=2048, help="llama rows")
    p.add_argument("--micro-batch", type=int, default=8, help="llama rows")
    p.add_argument("--gpt2-seq-len", type=int, default=1024)
    p.add_argument("--gpt2-micro-batch", type=int, default=16, help="x --gpt2-grad-accum: llm.c's 64 sequences")
    p.add_argument("--gpt2-grad-accum", type=int, default=4)
    p.add_argument("--steps", type=int, help="steps per job (quick 20, else 40)")
    p.add_argument("--warmup", type=int, help="steps left out of the medians (quick 8, else 10)")
    p.add_argument("--only", nargs="*", help="run only rows whose label contains one of these")
    p.add_argument("--json", help="also write the figures to this file (rewritten after every row)")
    p.add_argument("--log", help="append every job's output to this file")
    p.set_defaults(run=bench_gpu)
