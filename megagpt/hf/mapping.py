"""How a megagpt tensor is made from transformers' tensors: `Source` (copied,
transposed, fused rows), one entry of an adapter's table, with its inverse for export."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

Tensors = dict[str, torch.Tensor]


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
