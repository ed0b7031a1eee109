"""Which keys each query may see in causal self-attention, described once per
forward pass (`Visibility`): causal over the keys in the cache plus the new
ones and, with document masking, only the keys of the query's own document (a
packed sequence holds several documents separated by the end-of-document
token).  SDPA and the eager maths read it as a boolean mask; FlashAttention's
varlen kernels as cumulative segment lengths (`cu_seqlens`).  Both describe
the same visibility (tests/test_attention_backends.py checks it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def document_ids(idx: torch.Tensor, eod_id: int) -> torch.Tensor:
    """(B, T) token ids -> (B, T) the document index of every token within its
    row; an EOD closes (belongs to) its own document."""
    is_eod = (idx == eod_id).int()
    return torch.cumsum(is_eod, dim=1) - is_eod


def cu_seqlens(doc: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, T) document ids -> (cu_seqlens int32 (n_segments + 1,), longest
    segment) over the batch flattened to B * T tokens: a segment is one
    document inside one row (a row start always starts one), as FlashAttention's
    varlen kernels take them."""
    B, T = doc.shape
    start = torch.ones_like(doc, dtype=torch.bool)
    start[:, 1:] = doc[:, 1:] != doc[:, :-1]
    starts = torch.nonzero(start.flatten()).flatten()  # one host sync: the number of segments
    cu = torch.cat([starts, torch.tensor([B * T], device=doc.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def cu_seqlens_from_eod(idx: torch.Tensor, eod_id: int) -> tuple[torch.Tensor, int]:
    """cu_seqlens of a packed batch of token ids (B, T) from its EOD positions."""
    return cu_seqlens(document_ids(idx, eod_id))


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
        doc = document_ids(idx, eod_id) if eod_id is not None else None
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
        """cu_seqlens(self.doc), computed once."""
        if self._varlen is None:
            self._varlen = cu_seqlens(self.doc)
        return self._varlen
