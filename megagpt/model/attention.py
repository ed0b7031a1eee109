"""Causal self-attention kernels behind one switch.

softmax(Q K^T / sqrt(d)) V with a causal mask, computed by one of:
  flash_attn  the flash-attn package (CUDA only, optional extra)
  sdpa        torch.nn.functional.scaled_dot_product_attention (FlashAttention
              kernels on CUDA, a fused kernel on CPU)
  eager       the reference math, written out
`auto` picks the best one available on the device the model runs on.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

BACKENDS = ("flash_attn", "sdpa", "eager")


def flash_attn_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def resolve_backend(name: str, device_type: str) -> str:
    """Turn `auto` into a concrete backend; reject what cannot run here."""
    if name == "auto":
        if device_type == "cuda" and flash_attn_available():
            return "flash_attn"
        return "sdpa"
    if name == "flash_attn" and not (device_type == "cuda" and flash_attn_available()):
        raise ValueError(
            "model.attention=flash_attn needs CUDA and the flash-attn package "
            '(pip install -e ".[flash]"); use sdpa or auto here'
        )
    if name not in BACKENDS:
        raise ValueError(f"model.attention: unknown backend {name!r}; choose auto or one of {BACKENDS}")
    return name


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """q, k, v: (B, n_head, T, head_dim) -> (B, n_head, T, head_dim)."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if backend == "eager":
        T = q.size(-2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, T, T)
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        if dropout_p > 0:
            att = F.dropout(att, p=dropout_p)
        return att @ v
    if backend == "flash_attn":
        from flash_attn import flash_attn_func

        # flash-attn wants (B, T, H, D) in fp16/bf16.
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              dropout_p=dropout_p, causal=True)
        return out.transpose(1, 2)
    raise ValueError(f"unknown attention backend {backend!r}")
