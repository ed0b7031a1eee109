"""W&B never stops training: with logger.mode=online and W&B out of reach
(real local endpoints: a closed port, and a server that accepts and never
answers), wandb.init gives up within a bounded time and the run logs offline,
saying so in one line; a W&B that fails mid-run costs one warning, and
metrics.jsonl goes on."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from datetime import datetime

import pytest
from helpers import make_dataset, torchrun

from megagpt.config import LoggerConfig
from megagpt.metrics import MetricsSink

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 characters, as W&B's keys


@pytest.fixture
def closed_port():
    """A port nothing listens on: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port


@pytest.fixture
def silent_server():
    """A server that accepts connections (the kernel completes them into the
    backlog) and never answers: requests hang until the client gives up."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(128)
        yield s.getsockname()[1]


@pytest.fixture
def wandb_env(monkeypatch):
    """W&B's settings for one in-process test; its service is torn down after."""
    import wandb

    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield monkeypatch
    try:
        wandb.teardown()
    except Exception:  # noqa: BLE001 - a service a test killed cannot be torn down cleanly
        pass


def _fallback_lines(text: str) -> list[str]:
    return [ln[ln.index("W&B: ") :] for ln in text.splitlines() if "W&B: " in ln]


def _offline_dir(run_dir, run_id: str):
    (offline,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    return offline


@pytest.mark.slow
@pytest.mark.parametrize("server", ["closed_port", "silent_server"])
def test_unreachable_wandb_falls_back_to_offline(server, request, tmp_path, wandb_env, caplog, capfd):
    port = request.getfixturevalue(server)
    wandb_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    wandb_env.setenv("WANDB_INIT_TIMEOUT", "5")  # W&B's own setting, honoured; the default is tested below
    t0 = time.monotonic()
    sink = MetricsSink(str(tmp_path), LoggerConfig(kind="wandb", mode="online"), {"x": 1}, "abcd1234", 0)
    assert time.monotonic() - t0 < 30
    offline = _offline_dir(tmp_path, "abcd1234")
    (line,) = _fallback_lines(caplog.text)
    assert re.fullmatch(
        rf"W&B: cannot reach http://127\.0\.0\.1:{port} \(.+\); logging offline to {offline}; "
        rf"upload later with: wandb sync {offline}",
        line,
    ), line
    sink.log({"step": 1, "loss": 2.5})
    sink.log_event({"event": "rollback", "to_step": 0})
    sink.close()
    assert list(offline.glob("run-*.wandb"))
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [{"step": 1, "loss": 2.5}]
    out, err = capfd.readouterr()
    assert FAKE_KEY not in caplog.text + out + err


def _wandb_service_pids() -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True).stdout.split()
    pids = []
    for pid in map(int, children):
        try:
            if b"wandb-core" in open(f"/proc/{pid}/cmdline", "rb").read():
                pids.append(pid)
        except OSError:
            continue
    return pids


def test_wandb_failing_mid_run_costs_one_warning_and_metrics_go_on(tmp_path, wandb_env, caplog):
    """W&B's service process dies under a running sink: logging, events and
    close go on without W&B; metrics.jsonl keeps every record."""
    sink = MetricsSink(str(tmp_path), LoggerConfig(kind="wandb", mode="offline"), {}, "efgh5678", 0)
    sink.log({"step": 1, "loss": 3.0})
    (service,) = _wandb_service_pids()
    os.kill(service, signal.SIGKILL)
    os.waitpid(service, 0)
    for step in (2, 3):
        sink.log({"step": step, "loss": 3.0 - step / 10})
    sink.log_event({"event": "rollback", "to_step": 2})
    sink.rewind(2)
    sink.log({"step": 3, "loss": 2.8})
    sink.close()
    warnings = _fallback_lines(caplog.text)
    assert len(warnings) == 1 and warnings[0].startswith("W&B: logging failed (ConnectionResetError"), warnings
    assert warnings[0].endswith(f"metrics go on to {tmp_path / 'metrics.jsonl'} only"), warnings
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def _started(run_dir, name: str) -> datetime:
    """When W&B started a run directory (its name holds the time, to the second)."""
    stamp = re.match(r"(?:offline-)?run-(\d{8}_\d{6})-", name).group(1)
    return datetime.strptime(stamp, "%Y%m%d_%H%M%S")


@pytest.mark.slow
def test_training_with_wandb_online_but_unreachable_finishes_offline(tmp_path, silent_server):
    """A real 2-rank run with logger.mode=online against a server that never
    answers, with megagpt's own bound on wandb.init (W&B's default is 90 s,
    then a CommError stopped the run): exit 0, the fallback line, the offline run."""
    data = make_dataset(tmp_path / "d", n_docs=60, docs_per_shard=6)
    run_dir = tmp_path / "run"
    env = {"WANDB_BASE_URL": f"http://127.0.0.1:{silent_server}", "WANDB_API_KEY": FAKE_KEY}
    t0 = time.monotonic()
    r = torchrun(
        [
            f"run.dir={run_dir}",
            "data=webdataset",
            f"data.urls={data}",
            "data.seq_len=32",
            "model.n_layer=2",
            "model.n_head=4",
            "model.n_embd=64",
            "trainer.micro_batch_size=4",
            "trainer.max_steps=4",
            "trainer.save_every=4",
            "trainer.log_every=2",
            "logger.mode=online",
        ],
        cwd=tmp_path,
        env_extra=env,
        timeout=400,
    )
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    wandb_id = json.loads((run_dir / "run.json").read_text())["wandb_id"]
    offline = _offline_dir(run_dir, wandb_id)
    (line,) = _fallback_lines(r.stderr)
    assert line.startswith(f"W&B: cannot reach http://127.0.0.1:{silent_server} (") and line.endswith(
        f"; logging offline to {offline}; upload later with: wandb sync {offline}"
    ), line
    assert list(offline.glob("run-*.wandb"))
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    assert "done: 4 steps" in r.stdout
    assert FAKE_KEY not in r.stdout + r.stderr
    # The online attempt's directory and the offline run's: W&B gave up well before its own 90 s.
    (online,) = (run_dir / "wandb").glob(f"run-*-{wandb_id}")
    waited = (_started(run_dir, offline.name) - _started(run_dir, online.name)).total_seconds()
    assert 20 <= waited <= 45, waited
    assert elapsed < 240, elapsed
