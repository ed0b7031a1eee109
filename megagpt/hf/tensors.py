"""The tensors of a model, both ways, through the adapters' tables, and a
folder's safetensors read lazily."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Callable, Collection

import torch

from megagpt.hf.adapters import adapter
from megagpt.hf.mapping import Source, Tensors
from megagpt.model.config import GPTConfig


def sources(c: GPTConfig, stored: Collection[str] | None = None) -> dict[str, Source]:
    """The family adapter's table (Adapter.sources).  With `stored`, the names
    the folder's files hold: a name saved without the base model's prefix
    (GPT-2 as OpenAI published it: `h.0.attn.c_attn.weight`, not
    `transformer.h.0...`) is given as stored."""
    a = adapter(c.family)
    table = a.sources(c)
    if stored is None:
        return table
    stored = set(stored)

    def as_stored(name: str) -> str:
        bare = name.removeprefix(a.prefix)
        return bare if name not in stored and bare in stored else name

    return {k: dataclasses.replace(s, names=tuple(as_stored(n) for n in s.names)) for k, s in table.items()}


def _assemble(table: dict[str, Source], get: Callable[[str], torch.Tensor], c: GPTConfig) -> Tensors:
    """megagpt's state dict from `table`, reading each transformers tensor by `get`."""
    sd = {ours: src.combine([get(n) for n in src.names]) for ours, src in table.items()}
    if c.tie_embeddings:
        # load_state_dict wants the tied head by its name too; transformers ignores a stored one.
        sd["lm_head.weight"] = sd["wte.weight"]
    return {k: v.contiguous() for k, v in sd.items()}


def to_hf(sd: Tensors, c: GPTConfig) -> Tensors:
    """megagpt state dict -> the transformers class's state dict (fp32,
    contiguous), the output head included even where tied."""
    a = adapter(c.family)
    out: Tensors = {}
    for ours, src in a.sources(c).items():
        out.update(zip(src.names, src.split(sd[ours]), strict=True))
    out.update(a.hf_only(sd, c))
    if c.tie_embeddings:
        out["lm_head.weight"] = sd["wte.weight"]
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def from_hf(hf: Tensors, c: GPTConfig) -> Tensors:
    """The inverse of to_hf: a transformers state dict -> megagpt's."""
    return _assemble(sources(c, hf.keys()), hf.__getitem__, c)


def stored_tensors(folder: str) -> dict[str, str]:
    """Tensor name -> the safetensors file of `folder` holding it
    (model.safetensors, or the shards model.safetensors.index.json lists)."""
    from safetensors import safe_open

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return dict(json.load(f)["weight_map"])
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
        return {name: "model.safetensors" for name in f.keys()}


def load_hf_state(folder: str, c: GPTConfig) -> Tensors:
    """megagpt's state dict for `c` from the folder's safetensors, reading
    only the tensors `sources` names (not GPT-2's attention-mask buffers)."""
    from safetensors import safe_open

    where = stored_tensors(folder)
    table = sources(c, where.keys())
    missing = [n for src in table.values() for n in src.names if n not in where]
    if missing:
        raise ValueError(
            f"{folder}: the safetensors files lack {len(missing)} tensors the model needs, e.g. {missing[:3]}"
        )
    with contextlib.ExitStack() as stack:
        files = {
            name: stack.enter_context(safe_open(os.path.join(folder, name), framework="pt"))
            for name in sorted(set(where.values()))
        }
        return _assemble(table, lambda n: files[where[n]].get_tensor(n), c)
