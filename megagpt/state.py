"""What must survive a restart besides the engine, each part with its own
`state_dict()` / `load_state_dict()` (torchtitan's Stateful protocol):

- `TrainState`: the step, tokens seen, the W&B run id and the event counters;
- `RngState`: this rank's random generators;
- the data position (`megagpt.data.loader.Batches`) and the hooks with state
  (`megagpt.hooks`) are Stateful too.

The checkpointer saves them together (megagpt_state.json holds the JSON parts
under the keys below, gathered by `Snapshot.gather_state_dict`, a collective;
RNG states go to `rng_rank<R>.pt`) and `checkpoint.restore` loads them back,
for a resume and for a rollback alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Counters:
    """Events of the run, counted across restarts and rollbacks."""

    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient
    rollbacks: int = 0
    loss_spikes: int = 0
    skipped_sequences: int = 0  # global sequences passed over by rollbacks


@dataclass
class TrainState:
    """The loop's counters.  In megagpt_state.json: step, tokens_seen and
    wandb_id at the top (resume_check, rollbacks and export read them there),
    the event counters under "counters"."""

    step: int = 0
    tokens_seen: int = 0
    wandb_id: str | None = None
    counters: Counters = field(default_factory=Counters)

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "wandb_id": self.wandb_id,
            "counters": asdict(self.counters),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.wandb_id = state["wandb_id"]
        self.counters = Counters(**{k: int(v) for k, v in state["counters"].items()})

    def rewind(self, state: dict) -> None:
        """Back to a checkpoint's step for a rollback; the counters of what
        happened since (skips, rollbacks, spikes) keep counting."""
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])


class RngState:
    """This rank's CPU generator and, on CUDA, its device generator."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def reseed(self, seed: int, rank: int, step: int) -> None:
        """A fresh, still deterministic stream: for a resume on another number
        of ranks, where the saved per-rank states do not map onto the new ranks."""
        torch.manual_seed(seed + 1_000_003 * (rank + 1) + step)


class Snapshot:
    """Everything megagpt_state.json holds: the Stateful parts (the train state,
    the data position, hooks with state) and a description of the run that is
    written, never loaded back (number of ranks, resolved config, the model's
    exact shape: export and resharding read it).  The engine's own files and
    the RNG states are written beside it by the checkpointer.  Not a Stateful:
    saving it is a collective (gather_state_dict), called by every rank."""

    VERSION = 1

    def __init__(self, train: TrainState, data: Stateful, hooks: dict[str, Stateful], description: dict):
        self.train, self.data, self.hooks, self.description = train, data, hooks, description

    def gather_state_dict(self) -> dict:
        """megagpt_state.json's content.  A collective, on every rank at once:
        the data's bad shards are the union over every rank's."""
        from megagpt import collectives

        data = self.data.state_dict()
        data["bad_shards"] = collectives.union(data.get("bad_shards", []))
        return {
            "version": self.VERSION,
            **self.train.state_dict(),
            "data": data,
            "hooks": {name: hook.state_dict() for name, hook in self.hooks.items()},
            **self.description,
        }

    def load_state_dict(self, saved: dict) -> None:
        self.train.load_state_dict(saved)
        self.data.load_state_dict(saved["data"])
        for name, hook in self.hooks.items():
            hook.load_state_dict(saved["hooks"][name])
