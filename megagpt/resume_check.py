"""What a resume may change, compared before anything is loaded.

A checkpoint records the config its run was started with, the model's exact
shape, the data layout its position counts in, and the precision
(megagpt_state.json: "config", "model", "data", "precision").  On resume,
this run's config is compared with that record, before DeepSpeed reads a
byte of the checkpoint:

- what a resume cannot honour stops the run, one line per key, saying what
  to do instead: the weights' shape (a different model), the ZeRO stage and
  the precision (DeepSpeed's files are laid out by both), and the data
  layout (the saved position counts windows of that layout);
- everything else that differs is honoured from the first step after the
  resume and announced, one line per key, old -> new: the schedule and the
  optimizer (trainer.max_steps, optim.*: the engine applies them on load,
  engine.TrainEngine._follow_config), the batch, logging, saving, ...
"""

from __future__ import annotations

from typing import Any

from megagpt.checkpoint import CheckpointError
from megagpt.model.families import family

# The model record's keys that fix the weights' shapes (max_seq_len too, for
# families with a learned position table).
SHAPE_KEYS = (
    "family",
    "n_layer",
    "n_head",
    "n_kv_head",
    "n_embd",
    "head_dim",
    "vocab_size",
    "mlp_hidden",
    "bias",
    "tie_embeddings",
)

# The data layout's keys (data.mixture.Mixture.layout) as config keys.
LAYOUT_KEYS = {
    "num_streams": "data.num_streams",
    "seq_len": "data.seq_len",
    "seed": "trainer.seed",
    "shuffle": "data.shuffle_shards",
    "shuffle_buffer": "data.shuffle_buffer",
    "mix_period": "data.mix_period",
    "sources": "the data sources (names, weights, shards)",
}

# Config keys a resume reads in its own way, announced with what happens.
NOTES = {
    "model.init_from": "not read on resume: the weights come from the checkpoint",
    "trainer.resume": None,
    "run.dir": None,
}  # None: never announced


class ResumeMismatch(CheckpointError):
    """A resume this config cannot honour; one line per differing key (`lines`)."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def compare(saved: dict, config: dict, model: dict, precision: str, layout: dict) -> tuple[list[str], list[str]]:
    """(changes, problems) between a checkpoint's record `saved` and this
    run's `config` (the resolved config tree as plain containers), `model`
    (the model record, asdict of GPTConfig), resolved `precision` and data
    `layout`.  Records written before a part existed skip that part."""
    problems = []
    refused_keys = set()

    def refuse(key: str, old: Any, new: Any, why: str) -> None:
        refused_keys.add(key)
        back = f"resume with {key}={_show(old)}" if "." in key else "resume with the checkpoint's data"
        problems.append(
            f"{key} is {_show(old)} in the checkpoint and {_show(new)} here: {why}; {back}, or "
            f"start a new run.dir from its weights (python -m megagpt.export, then "
            f"model.init_from=<export>)"
        )

    weights = "the checkpoint's weights have another shape"
    saved_model = saved.get("model") or {}
    shape = SHAPE_KEYS + (("max_seq_len",) if _learned_positions(saved_model) else ())
    for key in shape:
        if key in saved_model and saved_model[key] != model.get(key):
            refuse(f"model.{key}", saved_model[key], model.get(key), weights)

    saved_config = saved.get("config") or {}
    stage = _get(saved_config, "deepspeed.zero_stage")
    now_stage = _get(config, "deepspeed.zero_stage")
    if stage is not None and stage != now_stage:
        refuse(
            "deepspeed.zero_stage",
            stage,
            now_stage,
            "a checkpoint resumes at the ZeRO stage it was written with (on any number of ranks)",
        )
    if saved.get("precision") is not None and saved["precision"] != precision:
        refuse(
            "deepspeed.precision", saved["precision"], precision, "DeepSpeed lays out its optimizer state by precision"
        )

    saved_data = saved.get("data") or {}
    for key, name in LAYOUT_KEYS.items():
        if key in saved_data and _plain(saved_data[key]) != _plain(layout.get(key)):
            refuse(
                name,
                saved_data[key],
                layout.get(key),
                "the saved data position counts windows of the checkpoint's data layout",
            )

    changes = []
    if saved_config:
        old, new = _flatten(saved_config), _flatten(config)
        for key in sorted(set(old) | set(new)):
            if old.get(key) == new.get(key) or key in refused_keys:
                continue
            if key in NOTES and NOTES[key] is None:
                continue
            note = f" ({NOTES[key]})" if key in NOTES else ""
            changes.append(f"{key}: {_show(old.get(key))} -> {_show(new.get(key))}{note}")
    return changes, problems


def check(path: str, saved: dict, config: dict, model: dict, precision: str, layout: dict, log) -> None:
    """Raise ResumeMismatch for what cannot be honoured; announce the rest
    through `log` (None: say nothing, on ranks other than the first)."""
    changes, problems = compare(saved, config, model, precision, layout)
    if problems:
        raise ResumeMismatch([f"cannot resume from {path}: {p}" for p in problems])
    if log is not None:
        for change in changes:
            log(f"resume: {change} (this run's value applies from step {int(saved['step']) + 1})")


def _learned_positions(record: dict) -> bool:
    try:
        return family(record.get("family", "gpt2")).learned_positions
    except Exception:  # noqa: BLE001 - an unknown family is reported by the shape keys
        return True


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Leaf keys of a config tree, dotted; lists are leaves."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = _plain(value)
    return out


def _plain(x):
    return [_plain(v) for v in x] if isinstance(x, (list, tuple)) else x


def _show(value) -> str:
    return "null" if value is None else str(value)
