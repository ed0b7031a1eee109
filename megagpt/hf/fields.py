"""Reading config.json: its fields with transformers' defaults, one-line refusals
(HFConfigError) for what megagpt cannot compute exactly, and the RoPE settings."""

from __future__ import annotations

from typing import Any

from megagpt.model.config import ROPE_SCALINGS, GPTConfig


class HFConfigError(ValueError):
    """A Hugging Face model megagpt cannot map exactly (or cannot read); the
    message is one line naming config.json, its `architectures` and the problem."""


class _Refused(Exception):
    """An adapter's reader refuses a config.json: the problem alone;
    parse_hf_config adds the file and the architectures."""


class _Fields:
    """A config.json dict read by key: transformers' `default` where the key is
    absent, a value of another type refused.  `nullable` keys take None for an
    explicit null (transformers then derives the value)."""

    def __init__(self, cfg: dict, prefix: str = ""):
        self.cfg, self.prefix = cfg, prefix

    def get(self, key: str, default: Any, types: tuple[type, ...], nullable: bool = False) -> Any:
        value = self.cfg.get(key, default)
        if value is None and nullable:
            return None
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            kinds = "/".join(t.__name__ for t in types)
            raise _Refused(f"{self.prefix}{key} {value!r} is not {kinds}")
        return value

    def int(self, key: str, default: int | None, nullable: bool = False) -> int | None:
        return self.get(key, default, (int,), nullable)

    def float(self, key: str, default: float | None) -> float:
        return float(self.get(key, default, (int, float)))

    def flag(self, key: str, default: bool) -> bool:
        return self.get(key, default, (bool,))

    def text(self, key: str, default: str) -> str:
        return self.get(key, default, (str,))


def _refuse_unless(ok: bool, problem: str) -> None:
    if not ok:
        raise _Refused(problem)


def _read_rope(f: _Fields, max_positions: int) -> dict:
    """GPTConfig's rope settings from a Llama-style config.json, read the way
    transformers' RotaryEmbeddingConfigMixin does: `rope_scaling` (the 4.x
    name) when set, else `rope_parameters` (5.x); theta from that dict, else
    the top-level `rope_theta`, else 10000; the type from `rope_type`, else
    the older `type`, else default; llama3's original context from the dict,
    else max_position_embeddings."""
    key = "rope_scaling" if f.cfg.get("rope_scaling") else "rope_parameters"
    rope = f.cfg.get(key) or {}
    _refuse_unless(isinstance(rope, dict), f"{key} {rope!r} is not a dict")
    r = _Fields(rope, prefix=f"{key}.")
    theta = r.float("rope_theta", f.float("rope_theta", 10000.0))
    partial_rotary = r.float("partial_rotary_factor", f.float("partial_rotary_factor", 1.0))
    _refuse_unless(
        partial_rotary == 1.0,
        f"partial_rotary_factor {partial_rotary} is not supported (megagpt rotates the whole head)",
    )
    kind = r.text("rope_type", r.text("type", "default"))
    if kind == "default":
        return {"rope_theta": theta}
    _refuse_unless(
        kind in ROPE_SCALINGS, f"{key} type {kind!r} is not supported (supported: {', '.join(ROPE_SCALINGS)})"
    )
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in rope]
    _refuse_unless(not missing, f"{key} type {kind!r} lacks {', '.join(missing)}")
    return {
        "rope_theta": theta,
        "rope_scaling": kind,
        "rope_scaling_factor": r.float("factor", None),
        "rope_scaling_low_freq_factor": r.float("low_freq_factor", None),
        "rope_scaling_high_freq_factor": r.float("high_freq_factor", None),
        "rope_scaling_original_max_seq_len": r.int("original_max_position_embeddings", max_positions),
    }


def _rope_config(c: GPTConfig) -> dict:
    """config.json's rope fields for both transformers generations: 4.x reads
    rope_theta and rope_scaling, 5.x rope_parameters (rope_scaling first where present)."""
    scaling = {}
    if c.rope_scaling is not None:
        scaling = {
            "rope_type": c.rope_scaling,
            "factor": c.rope_scaling_factor,
            "low_freq_factor": c.rope_scaling_low_freq_factor,
            "high_freq_factor": c.rope_scaling_high_freq_factor,
            "original_max_position_embeddings": c.rope_scaling_original_max_seq_len,
        }
    out = {
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", **scaling, "rope_theta": c.rope_theta},
    }
    if scaling:
        out["rope_scaling"] = scaling
    return out
