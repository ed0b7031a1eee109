"""Checkpoints: <run.dir>/checkpoints/step_<N>/.

A checkpoint holds DeepSpeed's state (ZeRO shards of parameters and optimizer,
scheduler) and megagpt's own: `megagpt_state.json` (step, tokens seen, data
position, W&B run id, resolved config, the model's exact shape), the
tokenizer (`tokenizer.json`, so export and generation need only the checkpoint) and one `rng_rank<R>.pt` per rank
(tensors only, read with weights_only=True).  `megagpt_state.json` is written
last, after every rank has finished writing: a directory without it is
incomplete and never resumed from.

The checkpointer only gathers and writes; the training loop decides when.
DeepSpeed's own files are pickles: never load a checkpoint from a source you
do not trust.
"""

from __future__ import annotations

import json
import os
import re

import torch

STATE_FILE = "megagpt_state.json"
TOKENIZER_FILE = "tokenizer.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    pass


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step}")


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of complete checkpoints under root, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def resolve_resume(resume: str, root: str) -> str | None:
    """The checkpoint directory to resume from, or None to start fresh."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(root)
        return found[-1][1] if found else None
    path = os.path.abspath(resume)
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise CheckpointError(f"trainer.resume: {resume} is not a complete megagpt checkpoint "
                              f"(no {STATE_FILE})")
    return path


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save(engine, root: str, step: int, state: dict, rank: int, device: torch.device,
         tokenizer: bytes | None = None) -> str:
    """Collective: every rank must call it."""
    import torch.distributed as dist

    tag = f"step_{step}"
    path = os.path.join(root, tag)
    engine.save_checkpoint(root, tag=tag, save_latest=False)
    torch.save(rng_state(device), os.path.join(path, f"rng_rank{rank}.pt"))
    dist.barrier()
    if rank == 0:
        if tokenizer is not None:
            with open(os.path.join(path, TOKENIZER_FILE), "wb") as f:
                f.write(tokenizer)
        tmp = os.path.join(path, STATE_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
        os.replace(tmp, os.path.join(path, STATE_FILE))
    dist.barrier()
    return path


def load_state(path: str) -> dict:
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {STATE_FILE}: {e}") from None


def load(engine, path: str, env, device: torch.device, seed: int, zero_stage: int) -> dict:
    """Restore engine and RNG; returns megagpt's state dict. Collective.
    ZeRO-0 state is whole on every rank and loads on any number of ranks;
    ZeRO-1..3 shards only on as many ranks as wrote them."""
    root, tag = os.path.split(path.rstrip("/"))
    state = load_state(path)
    saved_world, rank = state.get("world_size", env.world_size), env.rank
    if saved_world != env.world_size and zero_stage > 0:
        raise CheckpointError(
            f"trainer.resume: {path} holds ZeRO-{zero_stage} shards of {saved_world} ranks and this run has "
            f"{env.world_size}; resharding ZeRO optimizer state is not supported yet: resume on {saved_world} "
            "ranks (ZeRO-0 checkpoints resume on any number)")
    load_path, _ = engine.load_checkpoint(root, tag=tag)
    if load_path is None:
        raise CheckpointError(f"checkpoint {path}: DeepSpeed found no state to load")
    rng_file = os.path.join(path, f"rng_rank{rank}.pt")
    if os.path.exists(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=True), device)
    else:  # resumed on more ranks than saved: a fresh stream, still deterministic
        torch.manual_seed(seed + 1_000_003 * (rank + 1) + state["step"])
    return state
