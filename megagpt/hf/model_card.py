"""The model card (README.md) of an export: what the model is, what it was
trained on and how, written from the checkpoint's own record.

Local paths never appear in it as they are: a path inside the run is
written relative to it, any other local path as its last component (a
folder's name); URLs stay as configured (`public_path`).
"""

from __future__ import annotations

import os

import yaml

from megagpt.model.config import GPTConfig

_URL_SCHEMES = ("http://", "https://", "pipe:", "s3://", "gs://", "hf://")


def public_path(value: str, run_dir: str | None = None) -> str:
    """`value` fit to publish: relative to `run_dir` inside it, a local path's
    last component otherwise, a URL unchanged."""
    if not isinstance(value, str) or value.startswith(_URL_SCHEMES) or not os.path.isabs(value):
        return value
    if run_dir is not None:
        inside = os.path.relpath(value, run_dir)
        if not inside.startswith(".."):
            return inside
    return os.path.basename(value.rstrip("/")) or value


def public_record(value, run_dir: str | None = None):
    """A config record (dicts, lists, scalars) with every absolute local path made public_path."""
    if isinstance(value, dict):
        return {k: public_record(v, run_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [public_record(v, run_dir) for v in value]
    return public_path(value, run_dir) if isinstance(value, str) else value


def _data_sources(data: dict, run_dir: str | None) -> list[str]:
    kind = data.get("source")
    if kind == "mixture":
        total = sum(float(s.get("weight", 1.0)) for s in data.get("sources") or []) or 1.0
        return [
            f"`{s.get('name')}`: {_urls(s.get('urls'), run_dir)} (weight {s.get('weight')}, "
            f"{100 * float(s.get('weight', 1.0)) / total:.0f}% of the sequences)"
            for s in data.get("sources") or []
        ]
    if kind == "embedded":
        return ["the Python standard library's sources (megagpt's built-in demonstration data, `data=embedded`)"]
    return [f"{_urls(data.get('urls'), run_dir)} (`data.source={kind}`)"]


def _urls(urls, run_dir: str | None) -> str:
    if isinstance(urls, list):
        return ", ".join(f"`{public_path(u, run_dir)}`" for u in urls)
    return f"`{public_path(urls, run_dir)}`"


def model_card(
    c: GPTConfig,
    architecture: str,
    n_params: int,
    dtype: str,
    tokenizer: str,
    name: str,
    state: dict | None = None,
    run_dir: str | None = None,
) -> str:
    """README.md's text.  `state`: the checkpoint's megagpt_state.json (None:
    a model from memory, no training record); `tokenizer`: what the
    tokenizer is, in words; `run_dir`: where local paths are made relative
    when the record names no run.dir."""
    state = state or {}
    # Paths relative to the run as configured (a copied run's card is the same card).
    run_dir = ((state.get("config") or {}).get("run") or {}).get("dir") or run_dir
    config = public_record(state.get("config") or {}, run_dir)
    source = state.get("init_from")
    origin = source["path"] if source else c.init_from  # a continued pretraining's source folder
    source_name = public_path(origin) if origin else None
    tags = ["megagpt", c.family, "text-generation"]
    lines = [
        "---",
        yaml.safe_dump({"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags}).strip(),
        "---",
        "",
        f"# {name}",
        "",
        f"A {c.family} language model ({architecture}) trained with megagpt"
        + (f", continued from `{source_name}`." if source_name else " from scratch."),
        "",
        "## Model",
        "",
        "| | |",
        "| --- | --- |",
        f"| architecture | `{architecture}` (megagpt family `{c.family}`) |",
        f"| parameters | {n_params:,} ({n_params / 1e6:.2f} M) |",
        f"| layers, width | {c.n_layer}, {c.n_embd} |",
        f"| attention heads | {c.n_head} query, {c.n_kv_head} key/value |",
        f"| context | {c.max_seq_len} tokens |",
        f"| vocabulary | {c.vocab_size} rows |",
        f"| output head | {'tied to the token embeddings' if c.tie_embeddings else 'untied'} |",
        f"| weights | {dtype} (safetensors) |",
    ]
    if state:
        t, data = config.get("trainer") or {}, config.get("data") or {}
        optim, ds = config.get("optim") or {}, config.get("deepspeed") or {}
        lines += [
            "",
            "## Training",
            "",
            "| | |",
            "| --- | --- |",
            f"| steps | {state.get('step')} |",
            f"| tokens seen | {state.get('tokens_seen') or 0:,} |",
            f"| sequence length | {data.get('seq_len')} |",
            f"| ranks | {state.get('world_size')} (ZeRO stage {ds.get('zero_stage')}, {state.get('precision')}) |",
            f"| optimizer | AdamW, lr {optim.get('lr')}, {optim.get('warmup_steps')} warmup steps, cosine decay "
            f"to {optim.get('min_lr_ratio')} x lr, weight decay {optim.get('weight_decay')} |",
            f"| micro-batch | {t.get('micro_batch_size')} sequences, {t.get('grad_accum')} accumulation step(s) |",
        ]
        if source:
            lines.append(
                f"| source model | `{source_name}` ({', '.join(source.get('architectures') or [])}; "
                f"config.json sha256 {str(source.get('config_sha256'))[:16]}...) |"
            )
        lines += ["", "## Data", "", *(f"- {s}" for s in _data_sources(data, run_dir))]
    lines += ["", "## Tokenizer", "", tokenizer + "."]
    if config:
        lines += [
            "",
            "## Training config",
            "",
            "The run's resolved configuration (`megagpt_state.json`), local paths shortened"
            + (" (the model's shape is the source model's, above)" if source_name else "")
            + ":",
            "",
            "```yaml",
            yaml.safe_dump(config, sort_keys=False).strip(),
            "```",
        ]
    return "\n".join(lines) + "\n"
