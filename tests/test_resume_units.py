"""What a start decides about the checkpoints and records already in run.dir,
in one process: which checkpoint `trainer.resume=auto` takes when some fail
verification, when it refuses to start over, what a resume may change in the
config (megagpt.resume_check), and that a new start appends to metrics.jsonl."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from test_checkpoint_units import alter, truncate, write_checkpoint

from megagpt.checkpoint import CheckpointError, resolve_resume
from megagpt.metrics import MetricsSink
from megagpt.resume_check import compare


def names(root) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_damaged_newer_checkpoints_are_set_aside_and_the_newest_intact_one_is_used(tmp_path):
    root = tmp_path / "checkpoints"
    intact = write_checkpoint(root / "step_2", 2)
    truncate(write_checkpoint(root / "step_4", 4))
    alter(write_checkpoint(root / "step_6", 6))
    assert resolve_resume("auto", str(root)) == str(intact)
    left = names(root)
    assert left[0] == "step_2" and left[1].startswith("step_4.damaged-") and left[2].startswith("step_6.damaged-")


def test_checkpoints_none_of_which_verifies_stop_the_start_and_stay_where_they_are(tmp_path):
    root = tmp_path / "checkpoints"
    truncate(write_checkpoint(root / "step_4", 4))
    alter(write_checkpoint(root / "step_6", 6))
    with pytest.raises(CheckpointError) as e:
        resolve_resume("auto", str(root))
    assert str(e.value) == (
        f"trainer.resume=auto: {root} holds 2 checkpoint(s) and none verifies (step_6: mp_rank_00_model_states.pt "
        "does not match its sha256 (corrupt); step_4: zero/optim_states.pt has 1790 bytes, the manifest says 1800 "
        "(truncated?)); not starting over: repair or remove them, resume from a path (trainer.resume=PATH), or "
        "start over with trainer.resume=never"
    )
    assert names(root) == ["step_4", "step_6"]
    assert resolve_resume("never", str(root)) is None


def test_checkpoints_set_aside_by_an_earlier_start_still_stop_a_start_over(tmp_path):
    root = tmp_path / "checkpoints"
    truncate(write_checkpoint(root / "step_4", 4))
    with pytest.raises(CheckpointError):
        resolve_resume("auto", str(root))
    (root / "step_4").rename(root / "step_4.damaged-1765000000")  # as an older megagpt set it aside
    with pytest.raises(CheckpointError) as e:
        resolve_resume("auto", str(root))
    assert (
        "holds 1 checkpoint(s) and none verifies (step_4.damaged-1765000000: set aside as damaged by an "
        "earlier start)" in str(e.value)
    )


def test_a_run_dir_without_checkpoints_starts_fresh(tmp_path):
    assert resolve_resume("auto", str(tmp_path / "checkpoints")) is None
    (tmp_path / "checkpoints").mkdir()
    write_checkpoint(tmp_path / "checkpoints" / "step_4.partial", 4)  # never committed
    assert resolve_resume("auto", str(tmp_path / "checkpoints")) is None


# -- what a resume may change -----------------------------------------------------------------

MODEL = {
    "family": "gpt2",
    "n_layer": 2,
    "n_head": 4,
    "n_kv_head": 4,
    "n_embd": 64,
    "vocab_size": 320,
    "mlp_hidden": 256,
    "bias": True,
    "tie_embeddings": True,
    "max_seq_len": 32,
    "dropout": 0.0,
}
LAYOUT = {
    "num_streams": 16,
    "seq_len": 32,
    "seed": 1234,
    "shuffle": True,
    "shuffle_buffer": 64,
    "mix_period": 100,
    "sources": [["train", 1.0, "abc"]],
}
CONFIG = {
    "run": {"dir": "/r"},
    "model": {"n_layer": 2, "init_from": None},
    "deepspeed": {"zero_stage": 3},
    "optim": {"lr": 1e-3, "beta1": 0.9},
    "trainer": {"max_steps": 20, "resume": "auto"},
    "data": {"urls": ["a", "b"]},
}


def saved(**changes) -> dict:
    record = {
        "step": 20,
        "config": json.loads(json.dumps(CONFIG)),
        "model": dict(MODEL),
        "precision": "fp32",
        "data": {"consumed": 160, **LAYOUT},
    }
    record.update(changes)
    return record


def test_an_unchanged_config_is_neither_refused_nor_announced():
    assert compare(saved(), CONFIG, MODEL, "fp32", LAYOUT) == ([], [])


def test_schedule_and_optimizer_changes_are_announced_one_line_a_key():
    config = json.loads(json.dumps(CONFIG))
    config["optim"].update(lr=2e-3, beta1=0.8)
    config["trainer"].update(max_steps=30, resume="/elsewhere")
    config["run"]["dir"] = "run"  # the same directory, spelled otherwise: not a change worth a line
    config["model"]["init_from"] = "/hf/llama"
    config["data"]["urls"] = ["a", "b", "c"]
    changes, problems = compare(saved(), config, MODEL, "fp32", LAYOUT)
    assert problems == []
    assert changes == [
        "data.urls: ['a', 'b'] -> ['a', 'b', 'c']",
        "model.init_from: null -> /hf/llama (not read on resume: the weights come from the checkpoint)",
        "optim.beta1: 0.9 -> 0.8",
        "optim.lr: 0.001 -> 0.002",
        "trainer.max_steps: 20 -> 30",
    ]


def test_shape_stage_precision_and_layout_changes_are_refused_one_line_a_key():
    config = json.loads(json.dumps(CONFIG))
    config["deepspeed"]["zero_stage"] = 1
    config["model"]["n_layer"] = 3
    model = {**MODEL, "n_layer": 3, "n_kv_head": 2, "max_seq_len": 64, "dropout": 0.1}
    layout = {**LAYOUT, "seq_len": 64, "sources": [["train", 1.0, "other shards"]]}
    changes, problems = compare(saved(), config, model, "bf16", layout)
    assert [p.split(":")[0] for p in problems] == [
        "model.n_layer is 2 in the checkpoint and 3 here",
        "model.n_kv_head is 4 in the checkpoint and 2 here",
        "model.max_seq_len is 32 in the checkpoint and 64 here",
        "deepspeed.zero_stage is 3 in the checkpoint and 1 here",
        "deepspeed.precision is fp32 in the checkpoint and bf16 here",
        "data.seq_len is 32 in the checkpoint and 64 here",
        "the data sources (names, weights, shards) is [['train', 1.0, 'abc']] in the checkpoint and [['train', 1.0, "
        "'other shards']] here",
    ]
    assert "resume with deepspeed.zero_stage=3, or start a new run.dir from its weights" in problems[3]
    assert changes == []  # refused keys are not announced as well


def test_a_rotary_models_context_may_change():
    rotary = {**MODEL, "family": "llama"}
    _, problems = compare(saved(model=rotary), CONFIG, {**rotary, "max_seq_len": 64}, "fp32", LAYOUT)
    assert problems == []


def test_records_of_older_checkpoints_skip_what_they_lack():
    assert compare({"step": 20}, CONFIG, MODEL, "fp32", LAYOUT) == ([], [])


# -- metrics.jsonl ----------------------------------------------------------------------------


def test_a_new_start_appends_to_metrics_jsonl_and_a_resume_drops_only_the_steps_it_repeats(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    no_logger = SimpleNamespace(kind="none")
    sink = MetricsSink(str(tmp_path), no_logger, {}, None, resumed_step=0)  # a new start
    sink.log({"step": 1, "loss": 2.0})
    sink.close()
    assert [json.loads(x) for x in path.read_text().splitlines()] == [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 1.0},
        {"step": 3, "loss": 1.0},
        {"step": 1, "loss": 2.0},
    ]
    sink = MetricsSink(str(tmp_path), no_logger, {}, None, resumed_step=2)  # a resume from step 2
    sink.close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 1]
