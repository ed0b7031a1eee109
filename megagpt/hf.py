"""The Hugging Face adapters: megagpt's GPT <-> transformers' model folders.

One adapter per family, registered in ADAPTERS (keyed by family name) with
its transformers class:

  gpt2     <-> GPT2LMHeadModel    (Conv1D weights are stored transposed: (in, out))
  llama    <-> LlamaForCausalLM   (q/k/v and gate/up are separate there, fused here;
                                   rope_scaling llama3 supported)
  mistral  <-> MistralForCausalLM (llama's tensors; no sliding window shorter
                                   than the model's max_seq_len)

The mapping of tensors is one table per adapter, `sources(c)`: for each
megagpt parameter, the transformers tensors it is made of and how (copied,
transposed, concatenated), with the inverse for export.  Import (`from_hf`,
`load_hf_state`) and export (`to_hf`) both read it, and it touches no tensor
data, so a large model can be loaded one module at a time from memory-mapped
safetensors.

Reading a config.json made elsewhere goes through one entry point,
`read_hf_config(folder)` (or `parse_hf_config(dict)`): every field that
matters to the computation is read, with transformers' default where the key
is absent, and whatever megagpt cannot compute exactly is refused with
HFConfigError, one line naming the file, its `architectures` and the problem.

Pure tensor renaming and reshaping, no transformers import: export writes
files, generation reads them.  The mapping is exact, so logits agree to
float rounding (tests/test_export.py and tests/test_hf_architectures.py check
it against transformers itself).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Collection

import torch

from megagpt.config import ConfigError
from megagpt.model.config import ROPE_SCALINGS, GPTConfig
from megagpt.model.gpt import GPT

Tensors = dict[str, torch.Tensor]


class HFConfigError(ValueError):
    """A Hugging Face model megagpt cannot map exactly (or cannot read); the
    message is one line naming config.json, its `architectures` and the problem."""


class _Refused(Exception):
    """An adapter's reader refuses a config.json: the problem alone;
    parse_hf_config adds the file and the architectures."""


# --- the tensor mapping ------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """How one megagpt tensor is made from transformers tensors: `combine`
    puts the tensors `names` (in this order) together; `split` is its
    inverse, one tensor per name (export).  Neither is called when the table
    is built: building it reads no tensor data."""
    names: tuple[str, ...]
    combine: Callable[[list[torch.Tensor]], torch.Tensor]
    split: Callable[[torch.Tensor], list[torch.Tensor]]


def _only(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0]


def _as_list(t: torch.Tensor) -> list[torch.Tensor]:
    return [t]


def _only_transposed(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0].t()  # (in, out) -> (out, in)


def _transposed_as_list(t: torch.Tensor) -> list[torch.Tensor]:
    return [t.t()]  # (out, in) -> (in, out)


def _concat_rows(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(ts, dim=0)  # k x (rows_i, ...) -> (sum rows_i, ...)


def _split_rows(t: torch.Tensor, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    return list(t.split(list(sizes), dim=0))  # (sum sizes, ...) -> (size_i, ...) each


def copied(name: str) -> Source:
    """The tensor as stored."""
    return Source((name,), _only, _as_list)


def transposed(name: str) -> Source:
    """GPT-2's Conv1D weights: stored (in, out), nn.Linear's are (out, in)."""
    return Source((name,), _only_transposed, _transposed_as_list)


def fused(names: tuple[str, ...], sizes: tuple[int, ...]) -> Source:
    """Separate matmuls there, one here: the tensors' rows one after the
    other (q/k/v, gate/up); `sizes` are their row counts."""
    return Source(names, _concat_rows, partial(_split_rows, sizes=sizes))


# --- config.json fields --------------------------------------------------------------


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
    _refuse_unless(partial_rotary == 1.0, f"partial_rotary_factor {partial_rotary} is not supported "
                                          "(megagpt rotates the whole head)")
    kind = r.text("rope_type", r.text("type", "default"))
    if kind == "default":
        return {"rope_theta": theta}
    _refuse_unless(kind in ROPE_SCALINGS, f"{key} type {kind!r} is not supported (supported: "
                                          f"{', '.join(ROPE_SCALINGS)})")
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in rope]
    _refuse_unless(not missing, f"{key} type {kind!r} lacks {', '.join(missing)}")
    return {"rope_theta": theta, "rope_scaling": kind, "rope_scaling_factor": r.float("factor", None),
            "rope_scaling_low_freq_factor": r.float("low_freq_factor", None),
            "rope_scaling_high_freq_factor": r.float("high_freq_factor", None),
            "rope_scaling_original_max_seq_len": r.int("original_max_position_embeddings", max_positions)}


def _rope_config(c: GPTConfig) -> dict:
    """config.json's rope fields for both transformers generations: 4.x reads
    rope_theta and rope_scaling, 5.x rope_parameters (rope_scaling first where present)."""
    scaling = {}
    if c.rope_scaling is not None:
        scaling = {"rope_type": c.rope_scaling, "factor": c.rope_scaling_factor,
                   "low_freq_factor": c.rope_scaling_low_freq_factor,
                   "high_freq_factor": c.rope_scaling_high_freq_factor,
                   "original_max_position_embeddings": c.rope_scaling_original_max_seq_len}
    out = {"rope_theta": c.rope_theta,
           "rope_parameters": {"rope_type": "default", **scaling, "rope_theta": c.rope_theta}}
    if scaling:
        out["rope_scaling"] = scaling
    return out


# --- the adapters --------------------------------------------------------------------


class Adapter:
    """How one family maps onto its transformers class.  Subclasses set the
    names and implement body_sources, config and config_from_hf."""
    family: str  # megagpt's family (model/families.py)
    model_type: str  # config.json's model_type
    architecture: str  # the transformers class
    prefix: str  # the base model's name in the class's tensor names ("model.")

    def body_sources(self, c: GPTConfig) -> dict[str, Source]:
        """sources() but the output head."""
        raise NotImplementedError

    def sources(self, c: GPTConfig) -> dict[str, Source]:
        """megagpt parameter name (as GPT(c).named_parameters() lists them: a
        tied lm_head.weight left out) -> the transformers tensors it is made of."""
        table = self.body_sources(c)
        if not c.tie_embeddings:
            table["lm_head.weight"] = copied("lm_head.weight")
        return table

    def hf_only(self, sd: Tensors, c: GPTConfig) -> Tensors:
        """Tensors the transformers class has and the megagpt model does not
        (export writes them; import ignores them)."""
        return {}

    def config(self, c: GPTConfig) -> dict:
        """The family's config.json fields (beside the common ones)."""
        raise NotImplementedError

    def config_from_hf(self, cfg: dict) -> GPTConfig:
        """A GPTConfig from the class's config.json fields (folders made
        elsewhere); raises _Refused or ConfigError (parse_hf_config words them)."""
        raise NotImplementedError


class GPT2Adapter(Adapter):
    family, model_type, architecture, prefix = "gpt2", "gpt2", "GPT2LMHeadModel", "transformer."
    # block: (megagpt module, GPT2 module, weight stored transposed there: Conv1D is (in, out)).
    BLOCK = (("ln_1", "ln_1", False), ("attn.qkv", "attn.c_attn", True), ("attn.proj", "attn.c_proj", True),
             ("ln_2", "ln_2", False), ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True))
    # GPT2Config's defaults (transformers), for keys a config.json leaves out.
    DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12}
    # GELU's tanh approximation, which megagpt computes (layers.GeluMLP).
    ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")

    def _modules(self, c: GPTConfig):
        """(megagpt module, transformers module, transposed) for every block."""
        for i in range(c.n_layer):
            for ours, theirs, transpose in self.BLOCK:
                yield f"blocks.{i}.{ours}", f"transformer.h.{i}.{theirs}", transpose

    def body_sources(self, c):
        table = {"wte.weight": copied("transformer.wte.weight"), "wpe.weight": copied("transformer.wpe.weight")}
        for ours, theirs, transpose in self._modules(c):
            table[f"{ours}.weight"] = (transposed if transpose else copied)(f"{theirs}.weight")
            if c.bias:
                table[f"{ours}.bias"] = copied(f"{theirs}.bias")
        table["ln_f.weight"] = copied("transformer.ln_f.weight")
        if c.bias:
            table["ln_f.bias"] = copied("transformer.ln_f.bias")
        return table

    def hf_only(self, sd, c):
        if c.bias:
            return {}
        # GPT-2 always has biases: a bias-free megagpt model exports zeros.
        out = {f"{theirs}.bias": torch.zeros(sd[f"{ours}.weight"].shape[0]) for ours, theirs, _ in self._modules(c)}
        out["transformer.ln_f.bias"] = torch.zeros(c.n_embd)
        return out

    def config(self, c):
        return {"n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "n_positions": c.max_seq_len,
                "n_inner": c.mlp_hidden, "activation_function": "gelu_new", "layer_norm_epsilon": c.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": c.init_std,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False}

    def config_from_hf(self, cfg):
        f, d = _Fields(cfg), self.DEFAULTS
        act = f.text("activation_function", "gelu_new")
        _refuse_unless(act in self.ACTIVATIONS, f"activation_function {act!r} is not supported "
                                                f"(supported: {', '.join(self.ACTIVATIONS)})")
        _refuse_unless(f.flag("scale_attn_weights", True), "scale_attn_weights false (attention scores not "
                                                           "scaled by 1/sqrt(head dim)) is not supported")
        for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            _refuse_unless(not f.flag(key, False), f"{key} true is not supported")
        n_embd = f.int("n_embd", d["n_embd"])
        n_inner = f.int("n_inner", None, nullable=True)  # null: 4 x n_embd, as GPT2MLP sizes it
        return GPTConfig(vocab_size=f.int("vocab_size", d["vocab_size"]), max_seq_len=f.int("n_positions",
                                                                                          d["n_positions"]),
                         family=self.family, n_layer=f.int("n_layer", d["n_layer"]),
                         n_head=f.int("n_head", d["n_head"]), n_embd=n_embd,
                         mlp_hidden=4 * n_embd if n_inner is None else n_inner, bias=True,
                         norm_eps=f.float("layer_norm_epsilon", 1e-5), init_std=f.float("initializer_range", 0.02),
                         tie_embeddings=f.flag("tie_word_embeddings", True))


class LlamaAdapter(Adapter):
    family, model_type, architecture, prefix = "llama", "llama", "LlamaForCausalLM", "model."
    # LlamaConfig's defaults (transformers), for keys a config.json leaves out.
    DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": None, "max_position_embeddings": 2048,
                "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
    ACTIVATIONS = ("silu", "swish")  # both SiLU in transformers' ACT2FN

    @staticmethod
    def block(c: GPTConfig) -> list[tuple[str, tuple[str, ...], tuple[int, ...] | None]]:
        """(megagpt tensor, the transformers tensors it holds, their row counts
        where it fuses several), in the block's parameter order. Fused here,
        separate there: q/k/v and gate/up."""
        H, KV, D, F = c.n_head, c.n_kv_head, c.head_dim, c.mlp_hidden
        linears = [("attn.qkv", tuple(f"self_attn.{x}_proj" for x in "qkv"), (H * D, KV * D, KV * D)),
                   ("attn.proj", ("self_attn.o_proj",), None),
                   ("mlp.fc", ("mlp.gate_proj", "mlp.up_proj"), (F, F)),
                   ("mlp.proj", ("mlp.down_proj",), None)]
        kinds = ("weight", "bias") if c.bias else ("weight",)
        table = [(f"{ours}.{kind}", tuple(f"{name}.{kind}" for name in theirs), sizes)
                 for ours, theirs, sizes in linears for kind in kinds]
        table.insert(0, ("ln_1.weight", ("input_layernorm.weight",), None))
        table.insert(1 + 2 * len(kinds), ("ln_2.weight", ("post_attention_layernorm.weight",), None))
        return table

    def body_sources(self, c):
        table = {"wte.weight": copied("model.embed_tokens.weight")}
        for i in range(c.n_layer):
            for ours, theirs, sizes in self.block(c):
                names = tuple(f"model.layers.{i}.{name}" for name in theirs)
                table[f"blocks.{i}.{ours}"] = fused(names, sizes) if sizes else copied(names[0])
        table["ln_f.weight"] = copied("model.norm.weight")
        return table

    def shape_config(self, c: GPTConfig) -> dict:
        """The fields Llama and Mistral share."""
        return {"num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head,
                "hidden_size": c.n_embd, "head_dim": c.head_dim, "intermediate_size": c.mlp_hidden,
                "hidden_act": "silu", "rms_norm_eps": c.norm_eps, "max_position_embeddings": c.max_seq_len,
                **_rope_config(c), "attention_dropout": 0.0, "initializer_range": c.init_std}

    def config(self, c):
        return {**self.shape_config(c), "attention_bias": c.bias, "mlp_bias": c.bias, "pretraining_tp": 1}

    def read_shape(self, f: _Fields) -> dict:
        """GPTConfig's fields from what Llama and Mistral share, checked."""
        d = self.DEFAULTS
        act = f.text("hidden_act", "silu")
        _refuse_unless(act in self.ACTIVATIONS, f"hidden_act {act!r} is not supported "
                                                f"(supported: {', '.join(self.ACTIVATIONS)})")
        hidden, heads = f.int("hidden_size", d["hidden_size"]), f.int("num_attention_heads", d["num_attention_heads"])
        _refuse_unless(heads > 0 and hidden % heads == 0,
                       f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        head_dim = f.int("head_dim", None, nullable=True)
        _refuse_unless(head_dim in (None, hidden // heads),
                       f"head_dim {head_dim} is not supported: megagpt's head size is hidden_size / "
                       f"num_attention_heads = {hidden // heads}")
        max_positions = f.int("max_position_embeddings", d["max_position_embeddings"])
        return {"family": self.family, "vocab_size": f.int("vocab_size", d["vocab_size"]),
                "max_seq_len": max_positions, "n_layer": f.int("num_hidden_layers", d["num_hidden_layers"]),
                "n_head": heads, "n_kv_head": f.int("num_key_value_heads", d["num_key_value_heads"], nullable=True),
                "n_embd": hidden, "mlp_hidden": f.int("intermediate_size", d["intermediate_size"]),
                "norm_eps": f.float("rms_norm_eps", d["rms_norm_eps"]),
                "init_std": f.float("initializer_range", 0.02),
                "tie_embeddings": f.flag("tie_word_embeddings", d["tie_word_embeddings"]),
                **_read_rope(f, max_positions)}

    def config_from_hf(self, cfg):
        f = _Fields(cfg)
        attention_bias, mlp_bias = f.flag("attention_bias", False), f.flag("mlp_bias", False)
        _refuse_unless(attention_bias == mlp_bias,
                       f"attention_bias {str(attention_bias).lower()} with mlp_bias {str(mlp_bias).lower()} is not "
                       "supported (megagpt has one bias switch for all linear layers)")
        return GPTConfig(**self.read_shape(f), bias=attention_bias)


class MistralAdapter(LlamaAdapter):
    """Llama's tensors and computation; no biases (MistralForCausalLM has
    none, whatever config.json says); a sliding window."""
    family, model_type, architecture, prefix = "mistral", "mistral", "MistralForCausalLM", "model."
    # MistralConfig's defaults (transformers), for keys a config.json leaves out.
    DEFAULTS = {**LlamaAdapter.DEFAULTS, "intermediate_size": 14336, "num_key_value_heads": 8,
                "max_position_embeddings": 4096 * 32, "sliding_window": 4096}

    def config(self, c):
        return {**self.shape_config(c), "sliding_window": c.sliding_window}

    def config_from_hf(self, cfg):
        f = _Fields(cfg)
        shape = self.read_shape(f)
        # Absent is MistralConfig's 4096; null is no window.
        # Any window reads: megagpt computes full causal attention, the same thing
        # for every sequence the window covers; the training sequence length
        # (hf_import, config_checks) and generation (generate.py) are held to it.
        window = f.int("sliding_window", self.DEFAULTS["sliding_window"], nullable=True)
        return GPTConfig(**shape, bias=False, sliding_window=window)


ADAPTERS: dict[str, Adapter] = {a.family: a for a in (GPT2Adapter(), LlamaAdapter(), MistralAdapter())}
BY_MODEL_TYPE: dict[str, Adapter] = {a.model_type: a for a in ADAPTERS.values()}
BY_ARCHITECTURE: dict[str, Adapter] = {a.architecture: a for a in ADAPTERS.values()}


def adapter(family: str) -> Adapter:
    if family not in ADAPTERS:
        raise ValueError(f"family {family!r} has no Hugging Face adapter; megagpt has {tuple(ADAPTERS)}")
    return ADAPTERS[family]


def adapter_for(c: GPTConfig) -> Adapter:
    """The adapter of c's family."""
    return adapter(c.family)


# --- tensors -------------------------------------------------------------------------


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
        raise ValueError(f"{folder}: the safetensors files lack {len(missing)} tensors the model needs, "
                         f"e.g. {missing[:3]}")
    with contextlib.ExitStack() as stack:
        files = {name: stack.enter_context(safe_open(os.path.join(folder, name), framework="pt"))
                 for name in sorted(set(where.values()))}
        return _assemble(table, lambda n: files[where[n]].get_tensor(n), c)


# --- config.json ---------------------------------------------------------------------


def hf_config(c: GPTConfig, eos_id: int | None) -> dict:
    """config.json for the transformers class of the family."""
    a = adapter(c.family)
    return {"vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_embeddings, "torch_dtype": "float32",
            "bos_token_id": eos_id, "eos_token_id": eos_id, "use_cache": True,
            # megagpt's own record, so generation can rebuild the model exactly.
            "megagpt": dataclasses.asdict(c),
            "architectures": [a.architecture], "model_type": a.model_type, **a.config(c)}


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
    """A GPTConfig from a config.json: megagpt's own record when present
    (older records' names included), otherwise parse_hf_config (folders made
    elsewhere)."""
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
