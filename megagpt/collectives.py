"""Every collective megagpt runs itself (DeepSpeed runs its own inside the engine).

Two kinds:
- agreement at the edges of training (start, a data error, a save): small
  Python objects gathered or broadcast, where a host round trip does not matter;
- the one per-step exchange (`sum_`), on device tensors, never read on the
  host here: the caller decides when to read.
With no process group, or a group of one, each is the identity.
"""

from __future__ import annotations

import torch


def group_size() -> int:
    """Ranks in the process group; 1 when there is none (nothing to exchange)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """All-reduce `tensor` in place (sum over ranks) and return it; no host read."""
    import torch.distributed as dist

    if group_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def agree(value, what: str):
    """Check every rank holds the same value (e.g. the output directory)."""
    import torch.distributed as dist

    if group_size() == 1:
        return value
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise ValueError(f"{what}: ranks disagree ({sorted(set(map(str, values)))}); set it explicitly")
    return value


def first_message(local: str | None) -> str | None:
    """The first rank's message among those that have one.  Called by every
    rank once the step's exchange has told them that some rank failed, so the
    ranks stop together, with the same one-line reason, instead of one rank
    dying while the others wait in a collective."""
    import torch.distributed as dist

    if group_size() == 1:
        return local
    messages: list = [None] * dist.get_world_size()
    dist.all_gather_object(messages, local)
    return next((m for m in messages if m), None)


def gather(value) -> list:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    import torch.distributed as dist

    if group_size() == 1:
        return [value]
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def union(items: list[str]) -> list[str]:
    """The sorted union of every rank's items."""
    import torch.distributed as dist

    if group_size() == 1:
        return sorted(set(items))
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(items))
    return sorted(set().union(*gathered))


def broadcast_from_main(value):
    """Rank 0's value (any picklable object) on every rank."""
    import torch.distributed as dist

    if group_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
