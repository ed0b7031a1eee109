"""The model families: one row each, saying what differs between them.

Every family shares one skeleton (gpt.py): token embeddings, pre-norm blocks
of causal self-attention (fused q/k/v, grouped-query where n_kv_head <
n_head) and an MLP, a final norm, an output head (tied to the token
embeddings or not: model.tie_embeddings, any family).  A row fills the slots:

  positions  "learned": a (max_seq_len, n_embd) table `wpe` added to the token
             embeddings (a lookup: not counted in the matmul parameters);
             "rotary": RoPE on queries and keys (needs an even head dim)
  norm       ln_1, ln_2 and ln_f: (dim, eps, bias) -> module
  mlp        the MLP: (dim, hidden, bias) -> module with `fc` and `proj`
  mlp_width  the MLP width where model.mlp_hidden is None: (model config) -> int
  biases     whether the linear layers may have biases (model.bias); a family
             whose Hugging Face class has none (Mistral) says False
  qkv_bias   the q/k/v projection has biases whatever model.bias says (Qwen2:
             there and nowhere else)
  qk_norm    RMSNorm over each head of q and k, before RoPE (Qwen3: q_norm, k_norm)
  own_head_dim  model.head_dim may differ from n_embd / n_head (Qwen3's class
             reads config.json's head_dim; the others' exports assume n_embd / n_head)

Adding a family: a row here, the modules it names (layers.py), and its
Hugging Face adapter (megagpt/hf/adapters.py).  The model, parameter counting and
config validation read the row; nothing else branches on the family's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from megagpt.config import ConfigError
from megagpt.model.layers import GeluMLP, SwiGLU, layer_norm, rms_norm

POSITIONS = ("learned", "rotary")


@dataclass(frozen=True)
class Family:
    name: str
    summary: str
    positions: str
    norm: Callable[[int, float, bool], nn.Module]
    mlp: Callable[[int, int, bool], nn.Module]
    mlp_width: Callable[[Any], int]
    biases: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False
    own_head_dim: bool = False

    def __post_init__(self):
        if self.positions not in POSITIONS:
            raise ValueError(f"family {self.name}: positions {self.positions!r} is not one of {POSITIONS}")

    @property
    def learned_positions(self) -> bool:
        return self.positions == "learned"

    @property
    def rotary(self) -> bool:
        return self.positions == "rotary"


def _ratio_width(m) -> int:
    """model.mlp_ratio x n_embd (4 x: GPT-2)."""
    return m.mlp_ratio * m.n_embd


def _swiglu_width(m) -> int:
    """SwiGLU with about the parameters of a 4 x GELU MLP: 8/3 n_embd,
    rounded up to a multiple of model.mlp_multiple."""
    h = int(8 * m.n_embd / 3)
    return -(-h // m.mlp_multiple) * m.mlp_multiple


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "gpt2",
            "learned positions, LayerNorm, GELU MLP",
            positions="learned",
            norm=layer_norm,
            mlp=GeluMLP,
            mlp_width=_ratio_width,
        ),
        Family(
            "llama",
            "rotary positions, RMSNorm, SwiGLU MLP",
            positions="rotary",
            norm=rms_norm,
            mlp=SwiGLU,
            mlp_width=_swiglu_width,
        ),
        # Llama's computation under another name, so that a Mistral model exports as
        # MistralForCausalLM (its sliding window: model.sliding_window).
        Family(
            "mistral",
            "llama's computation, no biases (Mistral)",
            positions="rotary",
            norm=rms_norm,
            mlp=SwiGLU,
            mlp_width=_swiglu_width,
            biases=False,
        ),
        # Qwen2 and Qwen2.5 (Qwen2ForCausalLM): biases on the q/k/v projection only.
        Family(
            "qwen2",
            "llama's computation, biases on q/k/v only (Qwen2, Qwen2.5)",
            positions="rotary",
            norm=rms_norm,
            mlp=SwiGLU,
            mlp_width=_swiglu_width,
            biases=False,
            qkv_bias=True,
        ),
        # Qwen3 (Qwen3ForCausalLM): no biases, q and k normalised per head, a head size of its own.
        Family(
            "qwen3",
            "llama's computation, RMSNorm on each head of q and k, no biases (Qwen3)",
            positions="rotary",
            norm=rms_norm,
            mlp=SwiGLU,
            mlp_width=_swiglu_width,
            biases=False,
            qk_norm=True,
            own_head_dim=True,
        ),
    )
}


def family(name: str) -> Family:
    """The row of family `name`; ConfigError naming model.family if there is none."""
    row = FAMILIES.get(name)
    if row is None:
        raise ConfigError(f"model.family: unknown family {name!r}; choose one of {tuple(FAMILIES)}")
    return row
