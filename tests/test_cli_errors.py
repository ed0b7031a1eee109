"""Config files and multiruns at the command line: a YAML syntax error or a
key typo inside a config file (a user's --config-dir, a config-group file,
the primary config) and a multirun whose points would share a run.dir each
stop at start with one line, exit code 2, on every rank, before anything runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import megagpt.config
import megagpt.train

MODEL_HEAD = "defaults:\n  - base_model\n  - _self_\n"
BROKEN_MODEL = MODEL_HEAD + "n_layer: 2\nn_head: [4\n"  # an unclosed flow sequence
PRIMARY_HEAD = "defaults:\n  - config\n  - _self_\n"


def _cli(cwd: Path, args: list[str], nproc: int = 0) -> tuple[subprocess.CompletedProcess, float]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env["MEGAGPT_CACHE"] = str(cwd / "cache")
    launcher = (
        ["-m", "megagpt.train"]
        if not nproc
        else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "megagpt.train"]
    )
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, *launcher, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180
    )
    return p, time.monotonic() - t0


def _one_error_line(p: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr[-3000:]
    assert len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith("megagpt: error (rank 0): "), lines[0]
    return lines[0][len("megagpt: error (rank 0): ") :]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- YAML syntax errors ---------------------------------------------------------


@pytest.mark.parametrize("flag", [["-cd", "{d}"], ["--config-dir", "{d}"], ["--config-dir={d}"]])
def test_yaml_error_in_a_config_group_file_is_one_line_with_file_and_line(tmp_path, flag):
    conf = tmp_path / "conf"
    bad = _write(conf / "model" / "x.yaml", BROKEN_MODEL)
    p, elapsed = _cli(tmp_path, [f.format(d=conf) for f in flag] + ["model=x"])
    line = _one_error_line(p)
    assert line == (
        f"{bad}:6:1: YAML syntax error: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence at line 5, column 9)"
    ), line
    assert elapsed < 30
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "flags",
    [
        ["-cd", "{d}", "-cn", "exp"],
        ["--config-dir", "{d}", "--config-name=exp"],
        ["-cp", "{d}", "-cn", "exp"],
        ["--config-path={d}", "--config-name", "exp"],
    ],
)
def test_yaml_error_in_the_primary_config_is_one_line_with_file_and_line(tmp_path, flags):
    conf = tmp_path / "conf"
    bad = _write(conf / "exp.yaml", PRIMARY_HEAD + "trainer:\n  max_steps: 5\n   save_every: 2\n")
    p, _ = _cli(tmp_path, [f.format(d=conf) for f in flags])
    assert _one_error_line(p).startswith(f"{bad}:6:14: YAML syntax error: mapping values are not allowed here")


@pytest.mark.slow
def test_yaml_error_stops_every_rank(tmp_path):
    conf = tmp_path / "conf"
    bad = _write(conf / "model" / "x.yaml", BROKEN_MODEL)
    p, elapsed = _cli(tmp_path, ["-cd", str(conf), "model=x"], nproc=2)
    assert p.returncode != 0
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("megagpt: error")]
    for rank in (0, 1):
        assert f"megagpt: error (rank {rank}): {bad}:6:1: YAML syntax error: " in "\n".join(errors), p.stderr
    assert "ParserError" not in p.stderr  # (torchrun prints its own report of the failed workers)
    assert elapsed < 90


# --- key typos inside config files -------------------------------------------------


def test_key_typo_in_a_config_group_file_names_the_key_and_the_file(tmp_path):
    conf = tmp_path / "conf"
    typo = _write(conf / "model" / "x.yaml", MODEL_HEAD + "n_layr: 2\n")
    p, _ = _cli(tmp_path, ["-cd", str(conf), "model=x"])
    assert _one_error_line(p) == (
        f"model.n_layr: unknown key (ModelConfig has no setting 'n_layr'; did you mean model.n_layer?) in {typo}"
    )


def test_key_typo_in_the_primary_config_names_the_key_and_the_file(tmp_path):
    conf = tmp_path / "conf"
    exp = _write(conf / "exp.yaml", PRIMARY_HEAD + "trainer: {max_step: 5}\n")
    p, _ = _cli(tmp_path, ["-cd", str(conf), "-cn", "exp"])
    assert _one_error_line(p) == (
        "trainer.max_step: unknown key (TrainerConfig has no setting 'max_step'; "
        f"did you mean trainer.max_steps?) in {exp}"
    )


def test_missing_config_dir_is_one_line(tmp_path):
    p, _ = _cli(tmp_path, ["-cd", str(tmp_path / "nope"), "trainer.max_steps=3"])
    assert _one_error_line(p) == f"Additional config directory '{tmp_path / 'nope'}' not found"


# --- multiruns whose points share a run.dir ---------------------------------------------


def test_multirun_points_sharing_a_run_dir_are_refused_before_any_runs(tmp_path):
    shared = tmp_path / "x"
    p, elapsed = _cli(tmp_path, ["-m", "optim.lr=1e-3,2e-3", f"run.dir={shared}", "logger=none"])
    assert _one_error_line(p) == (
        f"run.dir: points 0 and 1 of this multirun share run.dir {shared} (the second would resume the first's "
        f"checkpoint); make run.dir differ per point, e.g. 'run.dir={shared}/${{optim.lr}}', or leave it unset: "
        "each point then gets its own default"
    )
    assert elapsed < 30
    assert not shared.exists() and not (tmp_path / "outputs").exists()  # nothing ran, no sweep dir


def test_multirun_with_run_dir_and_sweep_set_in_a_config_file_is_refused(tmp_path):
    conf = tmp_path / "conf"
    _write(
        conf / "sweep.yaml",
        PRIMARY_HEAD + f"run: {{dir: {tmp_path / 'fixed'}}}\n"
        "hydra:\n  sweeper:\n    params:\n      model: tiny,llama-tiny\n",
    )
    p, _ = _cli(tmp_path, ["-cd", str(conf), "-cn", "sweep", "--multirun", "logger=none"])
    line = _one_error_line(p)
    assert line.startswith(f"run.dir: points 0 and 1 of this multirun share run.dir {tmp_path / 'fixed'} "), line
    # a config group is swept: its name is Hydra's, not a config value
    assert f"'run.dir={tmp_path / 'fixed'}/${{hydra:runtime.choices.model}}'" in line, line


def test_every_point_of_a_multirun_is_checked_at_start(tmp_path):
    """A typo in the second point's value only: stopped before the first point runs."""
    p, _ = _cli(tmp_path, ["-m", "trainer.max_steps=3,abc", "logger=none"])
    line = _one_error_line(p)
    assert "trainer.max_steps" in line and "abc" in line, line
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_multirun_points_with_their_own_run_dirs_pass_the_check(tmp_path, capsys):
    """In-process: precheck returns for points whose run.dir differs (an
    interpolation of a swept key, Hydra's job number, or unset), and refuses
    the same sweep with a fixed run.dir."""
    megagpt.config.register()
    sweep = ["-m", "optim.lr=1e-3,2e-3", "logger=none"]
    for run_dir in (
        [f"run.dir={tmp_path}/${{optim.lr}}"],
        [f"run.dir={tmp_path}/${{hydra:job.num}}"],
        ["run.dir=${hydra:runtime.output_dir}"],
        [],
    ):
        megagpt.train.precheck(sweep + run_dir)
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as e:
        megagpt.train.precheck(sweep + [f"run.dir={tmp_path}"])
    assert e.value.code == 2
    assert f"share run.dir {tmp_path} " in capsys.readouterr().err
    # Hydra's own state is left as it was: the real run sets it up again
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    assert not GlobalHydra.instance().is_initialized() and not HydraConfig.initialized()


@pytest.mark.slow
@pytest.mark.parametrize(
    "args", [["--cfg", "job", "trainer.max_steps=3"], ["--help"], ["--version"], ["--info", "config"]]
)
def test_hydra_only_flags_go_to_hydra(tmp_path, args):
    p, _ = _cli(tmp_path, args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "megagpt: error" not in p.stderr
