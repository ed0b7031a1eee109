"""slurm/pretrain.sh on a real SLURM cluster: two emulated nodes on this machine
(.ci/slurm-up starts one; export the SLURM_CONF it prints).

- a 2-node job (one torchrun and one rank per node, c10d rendezvous, gloo) trains to the end;
- the lifecycle: a job that gets USR1 mid-run checkpoints, requeues itself, resumes in the
  same run.dir and W&B run, and finishes with exactly the losses of an uninterrupted job.

Skipped, with the reason, where sbatch is absent or the cluster does not answer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, make_dataset, wait_for

pytestmark = pytest.mark.slow  # real training jobs: the full suite only (docs/development.md)

SCRIPT = REPO / "slurm" / "pretrain.sh"
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch not on PATH: no SLURM here (start a local cluster with .ci/slurm-up, export SLURM_CONF)"
    conf = os.environ.get("SLURM_CONF")
    if conf and not os.path.exists(conf):  # sinfo would retry for 60 s
        return f"SLURM_CONF={conf} does not exist (.ci/slurm-up writes one and prints it)"
    try:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "the SLURM cluster does not answer (sinfo timed out); is SLURM_CONF set? (.ci/slurm-up prints it)"
    if r.returncode != 0:
        return f"the SLURM cluster does not answer (sinfo: {r.stderr.strip()[:300]}); .ci/slurm-up starts one"
    usable = {
        line.split()[0]
        for line in r.stdout.splitlines()
        if line.split() and line.split()[1].rstrip("*~#") in ("idle", "mix", "alloc", "comp")
    }
    if len(usable) < 2:
        return f"the SLURM cluster has fewer than 2 usable nodes (sinfo: {r.stdout.strip()!r})"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster():
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("slurm-data"), n_docs=160, docs_per_shard=8)


def overrides(data_dir: Path, run_dir: Path, steps: int, logger: str = "none") -> list[str]:
    return [
        f"run.dir={run_dir}",
        "data=webdataset",
        f"data.urls={data_dir}",
        "data.seq_len=32",
        "model.n_layer=2",
        "model.n_head=4",
        "model.n_embd=64",
        "trainer.micro_batch_size=4",
        f"trainer.max_steps={steps}",
        f"trainer.save_every={steps}",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "trainer.cpu_threads=1",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        "trainer.peak_flops=1e11",
        f"logger={logger}",
    ]


def submit(cwd: Path, out: Path, args: list[str]) -> str:
    """sbatch the script on 2 nodes with the CPU settings; return the job id."""
    env = {
        **os.environ,
        "MEGAGPT_NPROC_PER_NODE": "1",
        "MEGAGPT_RDZV_HOST": "127.0.0.1",
        "MEGAGPT_PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "WANDB_SILENT": "true",
        "WANDB_MODE": "offline",
    }
    env.pop("MEGAGPT_STOP_FILE", None)
    r = subprocess.run(
        ["sbatch", "--parsable", "-N2", f"--output={out}", "--job-name=megagpt-test", str(SCRIPT), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def job_info(job: str) -> dict[str, str]:
    """`scontrol show job` as a dict; empty once SLURM has forgotten the job (MinJobAge)."""
    r = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return {}
    return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)


def wait_done(jobs: dict[str, Path], timeout: float) -> dict[str, dict[str, str]]:
    """Poll the jobs (id -> output file) until each reaches a final state; return
    each one's final `scontrol show job` record."""
    last: dict[str, dict[str, str]] = {job: {} for job in jobs}
    done: dict[str, dict[str, str]] = {}

    def all_done() -> bool:
        for job, out in jobs.items():
            if job in done:
                continue
            info = job_info(job)
            assert info, f"job {job} forgotten by SLURM before a final state was seen ({last[job]}):\n{tail(out)}"
            last[job] = info
            if info.get("JobState") in FINAL_STATES:
                done[job] = info
        return len(done) == len(jobs)

    try:
        wait_for(
            all_done,
            timeout,
            what="the jobs to reach a final state",
            poll=0.5,
            detail=lambda: "; ".join(f"{j}: {last[j].get('JobState')}\n{tail(o, 3000)}" for j, o in jobs.items()),
        )
    except AssertionError:
        for job in jobs:
            subprocess.run(["scancel", job], timeout=30)
        raise
    return done


def tail(path: Path, n: int = 6000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no output file)"


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_two_node_job_runs_to_completion(data_dir, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    t0 = time.monotonic()
    job = submit(tmp_path, out, overrides(data_dir, run_dir, 6))
    info = wait_done({job: out}, timeout=240)[job]
    text = tail(out, 100_000)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-4000:])
    assert "on 2 node(s) x 1 process(es), rendezvous 127.0.0.1:" in text, text[-4000:]
    assert info["NumNodes"] == "2" and info["NodeList"] in ("node[1-2]", "node1,node2"), info
    assert "2 rank(s)" in text, text[-4000:]  # one rank per node, one world
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "checkpoints" / "step_6" / "megagpt_state.json").exists()
    assert "srun exited with status 0" in text
    print(f"2-node job {job}: {time.monotonic() - t0:.1f}s")


def test_usr1_checkpoints_requeues_and_resumes_with_identical_losses(data_dir, tmp_path):
    steps = 60
    ref_dir, ref_out = tmp_path / "ref", tmp_path / "ref.out"
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    t0 = time.monotonic()
    # The uninterrupted job and the interrupted one run side by side (1 CPU per node each).
    ref = submit(tmp_path, ref_out, overrides(data_dir, ref_dir, steps, logger="wandb"))
    job = submit(tmp_path, out, overrides(data_dir, run_dir, steps, logger="wandb"))

    # A few steps in, USR1 to the batch shell only (what `--signal=B:USR1@120` does near the time limit).
    def three_steps() -> bool:
        assert job_info(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), tail(out)
        return len(metrics(run_dir)) >= 3

    wait_for(three_steps, 180, what="3 steps logged", detail=lambda: tail(out))
    signalled_at = len(metrics(run_dir))
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)

    # It stops at a step boundary and requeues itself; the requeued job starts once
    # its begin time (cred_expire=10 s on the test cluster) has passed.  (Forcing
    # StartTime=now raced with the revocation of the old job's credential:
    # "Killing non-startable batch job: Job credential revoked".)
    def running_again() -> bool:  # or already done
        info = job_info(job)
        if int(info.get("Restarts", "0")) >= 1 and info.get("JobState") not in ("PENDING", "COMPLETING"):
            return True
        assert info.get("JobState") not in FINAL_STATES, (info, tail(out))
        return False

    wait_for(running_again, 120, what="the requeued job to run", poll=0.3, detail=lambda: (job_info(job), tail(out)))
    restarted_at = time.monotonic()

    final = wait_done({job: out, ref: ref_out}, timeout=300)
    info, ref_info = final[job], final[ref]
    text = tail(out, 1_000_000)
    assert ref_info["JobState"] == "COMPLETED" and ref_info["ExitCode"] == "0:0", (ref_info, tail(ref_out))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-6000:])
    assert int(info["Restarts"]) == 1, info

    # Both runs in the one output file (--open-mode=append): the stop, the requeue, the resume.
    starts = re.findall(r"megagpt: job \d+ \(restart (\d+)\)", text)
    assert starts == ["0", "1"], text[-6000:]
    assert "batch shell got SIGUSR1: stop requested" in text
    assert not (tmp_path / f".megagpt-stop-{job}").exists()  # removed when the requeued run started
    stop = re.search(r"megagpt: stop requested.*", text)
    assert stop, text[-6000:]
    resumed = re.search(r"resumed from (\S+) at step (\d+)", text)
    assert resumed, text[-6000:]
    stopped_step = int(resumed.group(2))
    assert signalled_at <= stopped_step < steps, (signalled_at, stopped_step)
    assert Path(resumed.group(1)) == run_dir / "checkpoints" / f"step_{stopped_step}"

    # Every step logged exactly once, with the uninterrupted job's losses, bit for bit.
    recs, ref_recs = metrics(run_dir), metrics(ref_dir)
    assert [r["step"] for r in recs] == list(range(1, steps + 1))
    assert [r["step"] for r in ref_recs] == list(range(1, steps + 1))
    assert [r["tokens_seen"] for r in recs] == [r["tokens_seen"] for r in ref_recs]
    diffs = [(a["step"], a["loss"], b["loss"]) for a, b in zip(recs, ref_recs) if a["loss"] != b["loss"]]
    assert not diffs, f"losses differ from the uninterrupted job's at {len(diffs)} step(s): {diffs[:5]}"
    state = json.loads((run_dir / "checkpoints" / f"step_{steps}" / "megagpt_state.json").read_text())
    assert state["data"]["consumed"] == steps * 2 * 4  # every sequence once: steps x ranks x micro-batch

    # The same W&B run across the requeue: one id, two offline segments of it.
    wandb_id = json.loads((run_dir / "run.json").read_text())["wandb_id"]
    assert state.get("wandb_id") == wandb_id
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{wandb_id}"))) == 2
    print(
        f"lifecycle: signal at step {signalled_at}, stop+checkpoint at step {stopped_step}, "
        f"requeued job running after {restarted_at - t0:.1f}s, all done after {time.monotonic() - t0:.1f}s"
    )
