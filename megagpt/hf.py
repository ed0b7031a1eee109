"""The Hugging Face adapter: megagpt's GPT <-> transformers' model folders.

  gpt2   <-> GPT2LMHeadModel  (Conv1D weights are stored transposed: (in, out))
  llama  <-> LlamaForCausalLM (q/k/v and gate/up are separate there, fused here)

Pure tensor renaming and reshaping, no transformers import: export writes
files, generation reads them.  The mapping is exact, so logits agree to
float rounding (tests/test_export.py checks it against transformers itself).
"""

from __future__ import annotations

import json
import os
from dataclasses import fields

import torch

from megagpt.model.gpt import FAMILIES, GPT, GPTConfig


# gpt2 block: (megagpt module, GPT2 module, weight stored transposed there: Conv1D is (in, out)).
_GPT2_BLOCK = (("ln_1", "ln_1", False), ("ln_2", "ln_2", False),
               ("attn.qkv", "attn.c_attn", True), ("attn.proj", "attn.c_proj", True),
               ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True))


def _llama_block(c: GPTConfig) -> list[tuple[str, tuple[str, ...], list[int] | None]]:
    """llama block: (megagpt tensor, the LlamaForCausalLM tensors it holds, the
    row sizes it splits into). Fused here, separate there: q/k/v and gate/up."""
    H, KV, D, F = c.n_head, c.n_kv_head, c.head_dim, c.mlp_hidden
    table = [("ln_1.weight", ("input_layernorm.weight",), None),
             ("ln_2.weight", ("post_attention_layernorm.weight",), None)]
    for kind in ("weight", "bias") if c.bias else ("weight",):
        table += [(f"attn.qkv.{kind}", tuple(f"self_attn.{x}_proj.{kind}" for x in "qkv"), [H * D, KV * D, KV * D]),
                  (f"attn.proj.{kind}", (f"self_attn.o_proj.{kind}",), None),
                  (f"mlp.fc.{kind}", (f"mlp.gate_proj.{kind}", f"mlp.up_proj.{kind}"), [F, F]),
                  (f"mlp.proj.{kind}", (f"mlp.down_proj.{kind}",), None)]
    return table


def to_hf(sd: dict[str, torch.Tensor], c: GPTConfig) -> dict[str, torch.Tensor]:
    """megagpt state dict -> the transformers class's state dict (fp32, contiguous)."""
    out = {}
    if c.family == "gpt2":
        out["transformer.wte.weight"] = sd["wte.weight"]
        out["transformer.wpe.weight"] = sd["wpe.weight"]
        for i in range(c.n_layer):
            p, q = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs, transpose in _GPT2_BLOCK:
                w = sd[p + ours + ".weight"]
                out[q + theirs + ".weight"] = w.t() if transpose else w
                # GPT-2 always has biases; a bias-free megagpt model exports zeros.
                out[q + theirs + ".bias"] = sd.get(p + ours + ".bias", torch.zeros(w.shape[0]))
        out["transformer.ln_f.weight"] = sd["ln_f.weight"]
        out["transformer.ln_f.bias"] = sd.get("ln_f.bias", torch.zeros(c.n_embd))
    else:
        out["model.embed_tokens.weight"] = sd["wte.weight"]
        for i in range(c.n_layer):
            p, q = f"blocks.{i}.", f"model.layers.{i}."
            for ours, theirs, sizes in _llama_block(c):
                parts = sd[p + ours].split(sizes) if sizes else (sd[p + ours],)
                out.update({q + name: part for name, part in zip(theirs, parts)})
        out["model.norm.weight"] = sd["ln_f.weight"]
    out["lm_head.weight"] = sd["wte.weight"] if c.tie_embeddings else sd["lm_head.weight"]
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def from_hf(hf: dict[str, torch.Tensor], c: GPTConfig) -> dict[str, torch.Tensor]:
    """The inverse of to_hf: a transformers state dict -> megagpt's."""
    sd = {}
    if c.family == "gpt2":
        sd["wte.weight"] = hf["transformer.wte.weight"]
        sd["wpe.weight"] = hf["transformer.wpe.weight"]
        for i in range(c.n_layer):
            p, q = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs, transpose in _GPT2_BLOCK:
                w = hf[q + theirs + ".weight"]
                sd[p + ours + ".weight"] = w.t() if transpose else w
                if c.bias:
                    sd[p + ours + ".bias"] = hf[q + theirs + ".bias"]
        sd["ln_f.weight"] = hf["transformer.ln_f.weight"]
        if c.bias:
            sd["ln_f.bias"] = hf["transformer.ln_f.bias"]
    else:
        sd["wte.weight"] = hf["model.embed_tokens.weight"]
        for i in range(c.n_layer):
            p, q = f"blocks.{i}.", f"model.layers.{i}."
            for ours, theirs, _ in _llama_block(c):
                sd[p + ours] = torch.cat([hf[q + name] for name in theirs])
        sd["ln_f.weight"] = hf["model.norm.weight"]
    sd["lm_head.weight"] = hf.get("lm_head.weight", sd["wte.weight"])
    return {k: v.contiguous() for k, v in sd.items()}


def hf_config(c: GPTConfig, eos_id: int | None) -> dict:
    """config.json for the transformers class of the family."""
    common = {"vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_embeddings, "torch_dtype": "float32",
              "bos_token_id": eos_id, "eos_token_id": eos_id, "use_cache": True,
              # megagpt's own shape, so generation can rebuild the model exactly.
              "megagpt": {f.name: getattr(c, f.name) for f in fields(c)}}
    if c.family == "gpt2":
        return {**common, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "n_positions": c.max_seq_len,
                "n_inner": c.mlp_hidden, "activation_function": "gelu_new", "layer_norm_epsilon": c.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": c.init_std,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False}
    return {**common, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head,
            "hidden_size": c.n_embd, "head_dim": c.head_dim, "intermediate_size": c.mlp_hidden,
            "hidden_act": "silu", "rms_norm_eps": c.norm_eps, "max_position_embeddings": c.max_seq_len,
            "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
            "attention_bias": c.bias, "mlp_bias": c.bias, "attention_dropout": 0.0,
            "initializer_range": c.init_std, "pretraining_tp": 1}


def config_from_hf(cfg: dict) -> GPTConfig:
    """A GPTConfig from a config.json: megagpt's own record when present,
    otherwise read from the transformers fields (folders made elsewhere)."""
    if "megagpt" in cfg:
        known = {f.name for f in fields(GPTConfig)}
        return GPTConfig(**{k: v for k, v in cfg["megagpt"].items() if k in known})
    kind = cfg.get("model_type")
    if kind == "gpt2":
        return GPTConfig(vocab_size=cfg["vocab_size"], max_seq_len=cfg["n_positions"], family="gpt2",
                         n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                         mlp_hidden=cfg.get("n_inner") or 4 * cfg["n_embd"], bias=True,
                         norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                         tie_embeddings=cfg.get("tie_word_embeddings", True))
    if kind == "llama":
        rope = cfg.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
            raise ValueError(f"llama config with RoPE scaling {rope or cfg.get('rope_scaling')} is not supported")
        return GPTConfig(vocab_size=cfg["vocab_size"], max_seq_len=cfg["max_position_embeddings"], family="llama",
                         n_layer=cfg["num_hidden_layers"], n_head=cfg["num_attention_heads"],
                         n_kv_head=cfg.get("num_key_value_heads"), n_embd=cfg["hidden_size"],
                         mlp_hidden=cfg["intermediate_size"], bias=cfg.get("attention_bias", False),
                         norm_eps=cfg.get("rms_norm_eps", 1e-6),
                         rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
                         tie_embeddings=cfg.get("tie_word_embeddings", False))
    raise ValueError(f"config.json: model_type {kind!r} is not one of megagpt's families {FAMILIES}")


def load_hf_folder(folder: str, attention: str = "sdpa") -> GPT:
    """Build megagpt's GPT from a Hugging Face folder (model.safetensors, or
    shards listed in model.safetensors.index.json)."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, "config.json")) as f:
        c = config_from_hf(json.load(f))
    c.attention, c.doc_mask, c.checkpoint_every = attention, False, 0
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
