"""`python -m megagpt.bench gpu`: its rows run end to end on CPU (--cpu-smoke),
its JSON is well-formed, its budget and SIGTERM end it on time, and every row's
megagpt.train command composes.  The figures themselves need a GPU."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, wait_for

from megagpt.bench import gpu, gpu_rows, jobs

QUICK = [r.label for r in gpu_rows.ROWS if r.quick]


def bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megagpt.bench", "gpu", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def processes_mentioning(text: str) -> list[str]:
    out = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if entry.name.isdigit() and text in cmdline:
            out.append(f"{entry.name}: {cmdline[:200]}")
    return out


@pytest.mark.slow
def test_cpu_smoke_runs_every_quick_row(tmp_path):
    out, log = tmp_path / "bench.json", tmp_path / "log.txt"
    r = bench("--cpu-smoke", "--json", str(out), "--log", str(log))
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    fig = json.loads(out.read_text())
    assert fig["mode"] == "cpu-smoke" and fig["device"] == "cpu" and fig["corpus_prepare_s"] >= 0
    rows = {row["label"]: row for row in fig["rows"]}
    assert list(rows) == QUICK  # every quick row, in order, one entry each
    for label, row in rows.items():
        assert row["status"] in ("ok", "skipped"), (label, row)
        if row["status"] == "ok":
            saving = "async save" in label  # two saves (steps 2 and 4) and a step
            assert row["tokens_per_sec"] > 0 and row["mfu"] > 0 and row["steps_measured"] == (5 if saving else 2), row
            assert row["wall_s"] > 0
            if row["command"].startswith("-m torch.distributed.run"):  # megagpt's: launch to step 1
                assert len(row["losses"]) == row["steps_measured"], row  # every step's loss (no warm-up here)
                assert 0 < row["first_step_s"] <= row["wall_s"] + 1, row  # wall_s is timed around the job
        else:
            assert row["reason"].startswith("skipped: "), row
    # What a CPU can run, runs: megagpt's jobs (both presets, ZeRO-3 and ZeRO-0) and transformers' loop.
    for label in QUICK:
        if "fp8" not in label and "torchtitan" not in label:
            assert rows[label]["status"] == "ok", rows[label]
    assert "CUDA" in rows["llama-1b, megagpt, fp8 tensorwise, ZeRO-0"]["reason"]
    tt = rows["llama-1b, torchtitan, flex"]["reason"]
    assert "torchtitan does not import" in tt or "needs CUDA" in tt
    zero3 = rows["llama-1b, megagpt defaults (ZeRO-3)"]
    assert "deepspeed=" not in zero3["command"] and "model=llama-1b" in zero3["command"]
    assert any(x.startswith("attention: sdpa") for x in zero3["log_lines"])
    assert fig["skipped"] == [f"{label}: {rows[label]['reason']}" for label in QUICK if rows[label]["status"] != "ok"]
    text = log.read_text()
    assert all(f"===== {label}: " in text for label in QUICK if rows[label]["status"] == "ok")
    assert "device: cpu; cpu-smoke; 7 rows measured, 2 not" in r.stdout
    saves = rows["llama-1b, megagpt defaults, async save"]
    assert len(saves["save_waited_s"]) == 2 and all(x >= 0 for x in saves["save_waited_s"]), saves
    assert any("checkpoint step_2 committed: rank 0's files" in x for x in saves["log_lines"]), saves["log_lines"]
    assert any("checkpoint step_2.partial: staged " in x for x in saves["log_lines"]), saves["log_lines"]
    # Each job was stopped whole: torchrun's workers (in sessions of their own) went with it.
    root = zero3["command"].split("run.dir=")[1].split()[0].rsplit("/", 1)[0]
    assert processes_mentioning(root) == []


def test_budget_skips_what_no_longer_fits(tmp_path):
    out = tmp_path / "bench.json"
    r = bench("--cpu-smoke", "--budget", "1", "--only", "transformers", "--json", str(out), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [x["label"] for x in rows] == ["llama-1b, transformers, compile", "llama-1b, transformers, eager"]
    assert all(x["status"] == "skipped" and x["reason"].startswith("skipped: out of budget (needs ~") for x in rows)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_sigterm_stops_the_job_and_keeps_the_json(tmp_path):
    # `timeout` ends the bench with SIGTERM: the running job goes, all of it, and the JSON stays.
    out = tmp_path / "bench.json"
    p = subprocess.Popen(
        [sys.executable, "-m", "megagpt.bench", "gpu", "--cpu-smoke", "--only", "gpt2-124m", "--json", str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    job = []
    try:

        def started() -> list[int]:  # torchrun and its worker, the worker under way (importing, building)
            found = [pid for pid in jobs.descendants(p.pid) if "megagpt.train" in _cmdline(pid)]
            return found if len(found) >= 2 and max(_cpu_seconds(pid) for pid in found) >= 1.0 else []

        job = wait_for(started, 60, p, "the bench's training job to start", poll=0.1)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 124, p.stderr.read()[-2000:]
    fig = json.loads(out.read_text())
    assert fig["rows"][-1]["status"] == "interrupted"
    wait_for(lambda: not any(_alive(pid) for pid in job), 10, what="every process of the job to end", poll=0.05)


def test_quick_settings_fit_one_device_call():
    ns = argparse.Namespace(
        cpu_smoke=False,
        quick=True,
        budget=None,
        job_timeout=None,
        steps=None,
        warmup=None,
        seq_len=2048,
        micro_batch=8,
        gpt2_seq_len=1024,
        gpt2_micro_batch=16,
        gpt2_grad_accum=4,
    )
    s = gpu_rows.settings_from(ns)
    assert (s.steps, s.warmup, s.budget_s) == (20, 8, 330)
    g = s.shape("gpt2-124m")
    assert g["seq_len"] * g["micro_batch"] * g["grad_accum"] == 64 * 1024  # llm.c's tokens per step
    assert len(QUICK) == 9 and sum(r.est_s for r in gpu_rows.ROWS if r.quick) > 0
    cmd = gpu.DEVICE_COMMAND
    assert len(cmd) <= 2000 and "\n" not in cmd
    for part in (
        "--target /tmp/site .whl/*.whl",
        "PYTHONPATH=/tmp/site:$PWD",
        "MEGAGPT_CACHE=",
        "HF_HUB_OFFLINE=1",
        "megagpt.bench gpu --quick",
        "--json $OUT/bench.json",
        "pytest -m gpu",
        "timeout ",
        "if [ -d .fa4/b ]; then",
    ):
        assert part in cmd, part


def test_pace_scales_the_estimates():
    assert gpu.pace([]) == 1.0
    done = [
        {"status": "ok", "wall_s": 50, "planned_s": 100},
        {"status": "ok", "wall_s": 30, "planned_s": 100},
        {"status": "skipped", "planned_s": 100},
    ]
    assert gpu.pace(done) == 0.5  # median 0.4, bounded below at 0.5
    assert gpu.pace([{"status": "ok", "wall_s": 150, "planned_s": 100}]) == 1.5


@pytest.mark.parametrize("row", [r for r in gpu_rows.ROWS if r.runner == "megagpt"], ids=lambda r: r.label)
def test_every_megagpt_row_composes_and_validates_on_a_gpu(row, monkeypatch, tmp_path):
    # The command of each row, as the GPU run builds it, composes (known keys)
    # and passes validate() on a CUDA machine (torchao taken as present).
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from megagpt import config_checks
    from megagpt.config import register

    s = gpu_rows.Settings("full", 40, 10, 2048, 8, 1024, 16, 4, None, None)
    cmd = gpu.megagpt_command(row, s, str(tmp_path / "run"))
    overrides = cmd[cmd.index("megagpt.train") + 1 :]
    assert f"model={row.preset}" in overrides and "trainer.log_every=1" in overrides
    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=overrides))
    monkeypatch.setattr(config_checks, "torchao_problem", lambda: None)
    config_checks.validate(cfg, 1, cuda=True)
    assert cfg.trainer.micro_batch_size == (row.micro_batch or s.shape(row.preset)["micro_batch"])
    assert cfg.model.vocab_size == gpu_rows.PRESET_SHAPE[row.preset]["vocab_size"]
    if row.save_every:  # saves within the row's steps, in the background
        assert cfg.trainer.async_save and cfg.trainer.save_every == row.save_every < row.steps < cfg.trainer.max_steps
    else:
        assert cfg.trainer.max_steps > s.steps and cfg.trainer.save_every > cfg.trainer.max_steps  # no checkpoint


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is here")
def test_gpu_facts_and_flash_check_without_a_gpu():
    assert gpu.gpu_facts() is None
    assert gpu._flash_here() == "no CUDA device"


def test_loss_agreement_compares_moving_means():
    ref = [10.0 - 0.01 * i for i in range(300)]
    same = gpu.loss_agreement(ref, ref)
    assert same == {"steps": 300, "max_rel_diff_moving": 0.0, "window": 10, "rel_diff_last_50": 0.0}
    noisy = [x * (1.02 if i % 2 else 0.98) for i, x in enumerate(ref)]  # +-2% per step, even on average
    a = gpu.loss_agreement(noisy, ref)
    assert a["max_rel_diff_moving"] < 0.001 and a["rel_diff_last_50"] < 0.001
    drift = [x * (1.0 + 0.03 * i / 299) for i, x in enumerate(ref)]  # 3% apart by the end
    b = gpu.loss_agreement(drift, ref)
    assert 0.025 < b["max_rel_diff_moving"] < 0.031 and 0.025 < b["rel_diff_last_50"] < 0.03
    assert gpu.loss_agreement(ref[:5], ref) == {"steps": 5}
    # The float8 row is compared with the bf16 row of the same shape, data and schedule.
    rows = {r.label: r for r in gpu_rows.ROWS}
    fp8 = rows["llama-1b, megagpt, fp8 tensorwise, ZeRO-0, 300 steps"]
    bf16 = rows[fp8.loss_vs]
    assert (
        fp8.steps == bf16.steps == 300 and [o for o in fp8.overrides if o != "model.fp8=tensorwise"] == bf16.overrides
    )
