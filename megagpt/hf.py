"""The Hugging Face adapters: megagpt's GPT <-> transformers' model folders.

One adapter per family, registered in ADAPTERS (keyed by family name) with
its transformers class:

  gpt2   <-> GPT2LMHeadModel  (Conv1D weights are stored transposed: (in, out))
  llama  <-> LlamaForCausalLM (q/k/v and gate/up are separate there, fused here)

An adapter renames the tensors of the embeddings, blocks and final norm both
ways and writes / reads the family's config.json fields; the output head,
dtype and the config's common fields are handled once, below.  Adding a
family: its row in model/families.py and an adapter here.

Pure tensor renaming and reshaping, no transformers import: export writes
files, generation reads them.  The mapping is exact, so logits agree to
float rounding (tests/test_export.py checks it against transformers itself).
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from megagpt.model.config import GPTConfig
from megagpt.model.gpt import GPT

Tensors = dict[str, torch.Tensor]


class Adapter:
    """How one family maps onto its transformers class.  Subclasses set the
    names and implement the four methods."""
    family: str  # megagpt's family (model/families.py)
    model_type: str  # config.json's model_type
    architecture: str  # the transformers class

    def to_hf(self, sd: Tensors, c: GPTConfig) -> Tensors:
        """Every tensor but the output head, under the transformers names."""
        raise NotImplementedError

    def from_hf(self, hf: Tensors, c: GPTConfig) -> Tensors:
        """The inverse of to_hf."""
        raise NotImplementedError

    def config(self, c: GPTConfig) -> dict:
        """The family's config.json fields (beside the common ones)."""
        raise NotImplementedError

    def config_from_hf(self, cfg: dict) -> GPTConfig:
        """A GPTConfig from the class's config.json fields (folders made elsewhere)."""
        raise NotImplementedError


class GPT2Adapter(Adapter):
    family, model_type, architecture = "gpt2", "gpt2", "GPT2LMHeadModel"
    # block: (megagpt module, GPT2 module, weight stored transposed there: Conv1D is (in, out)).
    BLOCK = (("ln_1", "ln_1", False), ("ln_2", "ln_2", False),
             ("attn.qkv", "attn.c_attn", True), ("attn.proj", "attn.c_proj", True),
             ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True))

    def to_hf(self, sd, c):
        out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["wpe.weight"]}
        for i in range(c.n_layer):
            p, q = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs, transpose in self.BLOCK:
                w = sd[p + ours + ".weight"]
                out[q + theirs + ".weight"] = w.t() if transpose else w
                # GPT-2 always has biases; a bias-free megagpt model exports zeros.
                out[q + theirs + ".bias"] = sd.get(p + ours + ".bias", torch.zeros(w.shape[0]))
        out["transformer.ln_f.weight"] = sd["ln_f.weight"]
        out["transformer.ln_f.bias"] = sd.get("ln_f.bias", torch.zeros(c.n_embd))
        return out

    def from_hf(self, hf, c):
        sd = {"wte.weight": hf["transformer.wte.weight"], "wpe.weight": hf["transformer.wpe.weight"]}
        for i in range(c.n_layer):
            p, q = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs, transpose in self.BLOCK:
                w = hf[q + theirs + ".weight"]
                sd[p + ours + ".weight"] = w.t() if transpose else w
                if c.bias:
                    sd[p + ours + ".bias"] = hf[q + theirs + ".bias"]
        sd["ln_f.weight"] = hf["transformer.ln_f.weight"]
        if c.bias:
            sd["ln_f.bias"] = hf["transformer.ln_f.bias"]
        return sd

    def config(self, c):
        return {"n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "n_positions": c.max_seq_len,
                "n_inner": c.mlp_hidden, "activation_function": "gelu_new", "layer_norm_epsilon": c.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": c.init_std,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False}

    def config_from_hf(self, cfg):
        return GPTConfig(vocab_size=cfg["vocab_size"], max_seq_len=cfg["n_positions"], family=self.family,
                         n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                         mlp_hidden=cfg.get("n_inner") or 4 * cfg["n_embd"], bias=True,
                         norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                         tie_embeddings=cfg.get("tie_word_embeddings", True))


class LlamaAdapter(Adapter):
    family, model_type, architecture = "llama", "llama", "LlamaForCausalLM"

    @staticmethod
    def block(c: GPTConfig) -> list[tuple[str, tuple[str, ...], list[int] | None]]:
        """(megagpt tensor, the LlamaForCausalLM tensors it holds, the row
        sizes it splits into). Fused here, separate there: q/k/v and gate/up."""
        H, KV, D, F = c.n_head, c.n_kv_head, c.head_dim, c.mlp_hidden
        table = [("ln_1.weight", ("input_layernorm.weight",), None),
                 ("ln_2.weight", ("post_attention_layernorm.weight",), None)]
        for kind in ("weight", "bias") if c.bias else ("weight",):
            table += [(f"attn.qkv.{kind}", tuple(f"self_attn.{x}_proj.{kind}" for x in "qkv"),
                       [H * D, KV * D, KV * D]),
                      (f"attn.proj.{kind}", (f"self_attn.o_proj.{kind}",), None),
                      (f"mlp.fc.{kind}", (f"mlp.gate_proj.{kind}", f"mlp.up_proj.{kind}"), [F, F]),
                      (f"mlp.proj.{kind}", (f"mlp.down_proj.{kind}",), None)]
        return table

    def to_hf(self, sd, c):
        out = {"model.embed_tokens.weight": sd["wte.weight"]}
        for i in range(c.n_layer):
            p, q = f"blocks.{i}.", f"model.layers.{i}."
            for ours, theirs, sizes in self.block(c):
                parts = sd[p + ours].split(sizes) if sizes else (sd[p + ours],)
                out.update({q + name: part for name, part in zip(theirs, parts)})
        out["model.norm.weight"] = sd["ln_f.weight"]
        return out

    def from_hf(self, hf, c):
        sd = {"wte.weight": hf["model.embed_tokens.weight"]}
        for i in range(c.n_layer):
            p, q = f"blocks.{i}.", f"model.layers.{i}."
            for ours, theirs, _ in self.block(c):
                sd[p + ours] = torch.cat([hf[q + name] for name in theirs])
        sd["ln_f.weight"] = hf["model.norm.weight"]
        return sd

    def config(self, c):
        return {"num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head,
                "hidden_size": c.n_embd, "head_dim": c.head_dim, "intermediate_size": c.mlp_hidden,
                "hidden_act": "silu", "rms_norm_eps": c.norm_eps, "max_position_embeddings": c.max_seq_len,
                "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
                "attention_bias": c.bias, "mlp_bias": c.bias, "attention_dropout": 0.0,
                "initializer_range": c.init_std, "pretraining_tp": 1}

    def config_from_hf(self, cfg):
        rope = cfg.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
            raise ValueError(f"llama config with RoPE scaling {rope or cfg.get('rope_scaling')} is not supported")
        return GPTConfig(vocab_size=cfg["vocab_size"], max_seq_len=cfg["max_position_embeddings"],
                         family=self.family, n_layer=cfg["num_hidden_layers"], n_head=cfg["num_attention_heads"],
                         n_kv_head=cfg.get("num_key_value_heads"), n_embd=cfg["hidden_size"],
                         mlp_hidden=cfg["intermediate_size"], bias=cfg.get("attention_bias", False),
                         norm_eps=cfg.get("rms_norm_eps", 1e-6),
                         rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
                         tie_embeddings=cfg.get("tie_word_embeddings", False))


ADAPTERS: dict[str, Adapter] = {a.family: a for a in (GPT2Adapter(), LlamaAdapter())}
BY_MODEL_TYPE: dict[str, Adapter] = {a.model_type: a for a in ADAPTERS.values()}


def adapter(family: str) -> Adapter:
    if family not in ADAPTERS:
        raise ValueError(f"family {family!r} has no Hugging Face adapter; megagpt has {tuple(ADAPTERS)}")
    return ADAPTERS[family]


def to_hf(sd: Tensors, c: GPTConfig) -> Tensors:
    """megagpt state dict -> the transformers class's state dict (fp32, contiguous)."""
    out = adapter(c.family).to_hf(sd, c)
    out["lm_head.weight"] = sd["wte.weight"] if c.tie_embeddings else sd["lm_head.weight"]
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def from_hf(hf: Tensors, c: GPTConfig) -> Tensors:
    """The inverse of to_hf: a transformers state dict -> megagpt's."""
    sd = adapter(c.family).from_hf(hf, c)
    sd["lm_head.weight"] = hf.get("lm_head.weight", sd["wte.weight"])
    return {k: v.contiguous() for k, v in sd.items()}


def hf_config(c: GPTConfig, eos_id: int | None) -> dict:
    """config.json for the transformers class of the family."""
    a = adapter(c.family)
    return {"vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_embeddings, "torch_dtype": "float32",
            "bos_token_id": eos_id, "eos_token_id": eos_id, "use_cache": True,
            # megagpt's own record, so generation can rebuild the model exactly.
            "megagpt": dataclasses.asdict(c),
            "architectures": [a.architecture], "model_type": a.model_type, **a.config(c)}


def config_from_hf(cfg: dict) -> GPTConfig:
    """A GPTConfig from a config.json: megagpt's own record when present
    (older records' names included), otherwise read from the transformers
    fields by the adapter of its model_type (folders made elsewhere)."""
    if "megagpt" in cfg:
        return GPTConfig.from_record(cfg["megagpt"], ignore_unknown=True)
    kind = cfg.get("model_type")
    if kind not in BY_MODEL_TYPE:
        raise ValueError(f"config.json: model_type {kind!r} is not one of megagpt's families {tuple(BY_MODEL_TYPE)}")
    return BY_MODEL_TYPE[kind].config_from_hf(cfg)


def load_hf_folder(folder: str, attention: str = "sdpa") -> GPT:
    """Build megagpt's GPT from a Hugging Face folder (model.safetensors, or
    shards listed in model.safetensors.index.json)."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, "config.json")) as f:
        # transformers' classes do not mask documents; the model read from their folder does not either.
        c = dataclasses.replace(config_from_hf(json.load(f)).for_inference(attention), doc_mask=False)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    hf: dict[str, torch.Tensor] = {}
    for name in files:
        hf.update(load_file(os.path.join(folder, name)))
    model = GPT(c)
    model.load_state_dict(from_hf(hf, c), strict=True)
    return model.eval()
