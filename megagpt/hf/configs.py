"""config.json, both ways: written for export, read (one entry point) for
import, and a whole folder loaded as a megagpt model."""

from __future__ import annotations

import dataclasses
import json
import os

from megagpt.config import ConfigError
from megagpt.hf.adapters import BY_ARCHITECTURE, adapter
from megagpt.hf.fields import HFConfigError, _Refused
from megagpt.hf.tensors import load_hf_state
from megagpt.model.config import GPTConfig
from megagpt.model.gpt import GPT

# A source config.json's fields an export does not keep: where the source was loaded from.
_NOT_KEPT = ("_name_or_path",)


def hf_config(
    c: GPTConfig,
    eos_id: int | None,
    *,
    special: dict | None = None,
    dtype: str = "float32",
    source: dict | None = None,
) -> dict:
    """config.json for the transformers class of the family.  `special`:
    bos/eos/pad_token_id to write (default: bos = eos = eos_id, no pad);
    `dtype`: the weights' (torch_dtype for transformers 4.x, dtype for 5.x);
    `source`: the config.json of the folder the run started from, whose
    fields are kept wherever megagpt does not write them (e.g. pad_token_id,
    transformers_version, the fields of another library)."""
    a = adapter(c.family)
    ids = {"bos_token_id": eos_id, "eos_token_id": eos_id} if special is None else dict(special)
    ours = {
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_embeddings,
        "torch_dtype": dtype,
        "dtype": dtype,
        **ids,
        "use_cache": True,
        # megagpt's own record, so generation can rebuild the model exactly.
        "megagpt": dataclasses.asdict(c),
        "architectures": [a.architecture],
        "model_type": a.model_type,
        **a.config(c),
    }
    if source is None:
        return ours
    kept = {k: v for k, v in source.items() if k not in _NOT_KEPT and k not in ours}
    return {**kept, **ours}


def parse_hf_config(cfg: dict, where: str = "config.json") -> GPTConfig:
    """A GPTConfig from a config.json's transformers fields (its `megagpt`
    record, if any, ignored): the architecture's adapter reads every field
    that matters to the computation, with transformers' default where absent.
    Anything megagpt cannot compute exactly raises HFConfigError, one line
    naming `where`, the architectures and the problem.

    The GPTConfig holds the architecture: vocab_size (config.json's, not
    padded), max_seq_len (max_position_embeddings / n_positions), shape,
    norm eps, rope, tied head, biases; the training settings (dropout,
    attention backend, doc_mask, ...) keep GPTConfig's defaults."""
    archs = cfg.get("architectures")

    def refuse(problem: str) -> HFConfigError:
        return HFConfigError(" ".join(f"{where}: architectures {archs!r}: {problem}".splitlines()))

    supported = ", ".join(BY_ARCHITECTURE)
    if not (isinstance(archs, list) and len(archs) == 1):
        raise refuse(f"megagpt needs exactly one architecture (supported: {supported})")
    a = BY_ARCHITECTURE.get(archs[0])
    if a is None:
        raise refuse(f"architecture {archs[0]!r} is not supported (supported: {supported})")
    if cfg.get("model_type", a.model_type) != a.model_type:
        raise refuse(f"model_type {cfg.get('model_type')!r} does not match (expected {a.model_type!r})")
    if cfg.get("quantization_config") is not None:
        raise refuse("quantized weights (quantization_config) are not supported")
    try:
        return a.config_from_hf(cfg)
    except _Refused as e:
        raise refuse(str(e)) from None
    except ConfigError as e:  # megagpt's own model checks (model/config.py)
        raise refuse(f"megagpt cannot build it: {e}") from None


def read_hf_config(folder: str) -> GPTConfig:
    """The megagpt config of a Hugging Face model folder, from its
    config.json (parse_hf_config).  Raises HFConfigError (a ValueError), one
    line, for a config.json that is missing, unreadable or unsupported."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise HFConfigError(f"{path}: cannot read it: {type(e).__name__}: {' '.join(str(e).splitlines())}") from None
    if not isinstance(cfg, dict):
        raise HFConfigError(f"{path}: not a JSON object")
    return parse_hf_config(cfg, where=path)


def config_from_hf(cfg: dict, where: str = "config.json") -> GPTConfig:
    """A GPTConfig from a config.json: megagpt's own record when present,
    otherwise parse_hf_config (folders made elsewhere)."""
    if "megagpt" in cfg:
        return GPTConfig.from_record(cfg["megagpt"], ignore_unknown=True)
    return parse_hf_config(cfg, where)


def load_hf_folder(folder: str, attention: str = "sdpa") -> GPT:
    """Build megagpt's GPT from a Hugging Face folder (model.safetensors, or
    shards listed in model.safetensors.index.json)."""
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        # transformers' classes do not mask documents; the model read from their folder does not either.
        c = dataclasses.replace(config_from_hf(json.load(f), path).for_inference(attention), doc_mask=False)
    model = GPT(c)
    model.load_state_dict(load_hf_state(folder, c), strict=True)
    return model.eval()
