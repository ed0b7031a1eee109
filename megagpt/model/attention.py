"""Causal self-attention kernels behind one switch.

softmax(Q K^T / sqrt(d)) V with a causal mask, computed by one of:
  flash_attn  the flash-attn package (CUDA only, optional extra); packed
              documents go through its varlen kernels
  sdpa        torch.nn.functional.scaled_dot_product_attention (FlashAttention
              kernels on CUDA, a fused kernel on CPU)
  eager       the reference math, written out
`auto` picks the best one available on the device the model runs on.

What a query may see is described once per forward pass by `Visibility`:
causal over the keys in the cache plus the new ones, and with document masking
only the keys of its own document (a packed sequence holds several documents
separated by the end-of-document token).  Grouped-query attention (fewer key /
value heads than query heads) is handled by every backend: query head h reads
key/value head h // (n_head / n_kv_head).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

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


@dataclass
class Visibility:
    """Which keys each query sees, computed once per forward pass.

    T new queries at absolute positions offset..offset+T-1 attend to the
    offset + T keys before and at them (the cache plus the new ones)."""
    T: int
    offset: int = 0
    doc: torch.Tensor | None = None  # (B, T) document index of every token, or None
    _mask: torch.Tensor | None = None
    _varlen: tuple | None = None

    @staticmethod
    def of(idx: torch.Tensor, offset: int = 0, eod_id: int | None = None) -> "Visibility":
        """Visibility for token ids idx (B, T); eod_id set: document masking."""
        doc = None
        if eod_id is not None:
            is_eod = (idx == eod_id).int()
            doc = torch.cumsum(is_eod, dim=1) - is_eod  # an EOD closes its own document
        return Visibility(idx.size(1), offset, doc)

    @property
    def plain_causal(self) -> bool:
        return self.doc is None and self.offset == 0

    def mask(self, device: torch.device) -> torch.Tensor | None:
        """Boolean (B or 1, 1, T, offset + T), True where a query may attend;
        None where no mask is needed (one new token sees every cached key)."""
        if self._mask is None:
            if self.doc is None and self.T == 1:
                return None
            S = self.offset + self.T
            q = torch.arange(self.offset, S, device=device)[:, None]
            k = torch.arange(S, device=device)[None, :]
            m = (k <= q)[None, None]  # (1, 1, T, S)
            if self.doc is not None:
                if self.offset:
                    raise ValueError("document masking with a key/value cache is not supported")
                m = m & (self.doc[:, None, :, None] == self.doc[:, None, None, :])  # (B, 1, T, T)
            self._mask = m
        return self._mask

    def varlen(self) -> tuple[torch.Tensor, int]:
        """(cu_seqlens int32 (n_segments + 1,), longest segment) over the
        flattened batch: a segment is one document inside one row."""
        if self._varlen is None:
            doc = self.doc
            B, T = doc.shape
            start = torch.ones_like(doc, dtype=torch.bool)
            start[:, 1:] = doc[:, 1:] != doc[:, :-1]
            starts = torch.nonzero(start.flatten()).flatten()
            cu = torch.cat([starts, torch.tensor([B * T], device=doc.device)]).to(torch.int32)
            self._varlen = (cu, int((cu[1:] - cu[:-1]).max()))
        return self._varlen


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str,
                     vis: Visibility | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """q: (B, H, T, D); k, v: (B, KV, S, D) with H % KV == 0 and S = offset + T.
    Returns (B, H, T, D)."""
    vis = vis or Visibility(q.size(-2))
    gqa = k.size(1) != q.size(1)
    if backend == "sdpa":
        if vis.plain_causal:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=vis.mask(q.device), dropout_p=dropout_p,
                                              enable_gqa=gqa)
    if backend == "eager":
        if gqa:
            rep = q.size(1) // k.size(1)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, T, S)
        mask = vis.mask(q.device)
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        att = att.softmax(dim=-1)
        if dropout_p > 0:
            att = F.dropout(att, p=dropout_p)
        return att @ v
    if backend == "flash_attn":
        return _flash(q, k, v, vis, dropout_p)
    raise ValueError(f"unknown attention backend {backend!r}")


def _flash(q, k, v, vis: Visibility, dropout_p: float) -> torch.Tensor:
    import flash_attn

    # flash-attn wants (B, T, H, D) in fp16/bf16; its causal mask is aligned to
    # the end of the keys, which is what a cache needs.
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if vis.doc is None:
        return flash_attn.flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True).transpose(1, 2)
    B, T, H, D = q.shape
    cu, longest = vis.varlen()
    out = flash_attn.flash_attn_varlen_func(
        q.reshape(B * T, H, D), k.reshape(B * T, k.size(2), D), v.reshape(B * T, v.size(2), D),
        cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest,
        dropout_p=dropout_p, causal=True)
    return out.reshape(B, T, H, D).transpose(1, 2)
