"""Saving without holding up training: the checkpoint state is copied to host
memory during the save and written to disk afterwards, from another thread.

DeepSpeed builds each checkpoint file's dict (ZeRO shards, optimizer states,
schedule) and hands it to its checkpoint engine.  `StagedCheckpointEngine`
takes the place of DeepSpeed's `TorchCheckpointEngine` for
`trainer.async_save=true`:

- `save(state, path)` copies every storage the tensors of `state` use into a
  host buffer of its own (page-locked on CUDA, so the copies run
  asynchronously on the current stream), makes each tensor the same view of
  its storage's copy (with its Python attributes), and deep-copies everything
  else, so training may change the live state once DeepSpeed returns.
  Nothing is written yet.
- `commit` (DeepSpeed's last call of a save) waits for the device copies.
- `write_pending()` writes the staged files with the same `torch.save` call
  DeepSpeed's own engine makes; the checkpointer calls it from its background
  thread (torch.save releases the GIL while it writes).

A file written here is byte for byte the file DeepSpeed's own engine writes
from the same state on CPU (tests/test_staged_save.py, ZeRO-0, 2 and 3):
storages shared by several tensors (a tied weight) stay shared, views keep
their offsets and strides, tensors keep their Python attributes.  From CUDA
the tensors are written as CPU tensors: DeepSpeed loads every checkpoint file
with map_location to the CPU anyway.

The host buffers stay and are reused by the next save of the same file with
the same tensors: allocating page-locked memory is slow, copying into it fast.
They hold one checkpoint of this rank: about 14 bytes per parameter on one
GPU with bf16 weights and fp32 Adam (17 GB for llama-1b), and 1/world_size
of the optimizer's part under ZeRO-1..3.  On CUDA, torch's page-locked
allocator rounds each buffer (one per storage) up to a power of two, so the
page-locked memory held can reach up to twice that (unmeasured).  A save must be written before the
next one is staged (the checkpointer waits for its thread first).
"""

from __future__ import annotations

import copy
import logging
import os
import time

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo, CheckpointEngine

from megagpt.atomic import writing

log = logging.getLogger("megagpt")


class StagedCheckpointEngine(CheckpointEngine):
    """DeepSpeed checkpoint engine that stages files in host memory; see the module."""

    def __init__(self, device: torch.device, zipfile_serialization: bool = True):
        super().__init__(None)
        self.name = "megagpt.StagedCheckpointEngine"
        self.device = device
        self.zipfile_serialization = zipfile_serialization
        self.pinned = device.type == "cuda"
        self._buffers: dict[str, list[torch.Tensor]] = {}  # file name -> its host buffers, in staging order
        self._pending: list[tuple[object, str]] = []  # (staged state, path), in DeepSpeed's order
        self.staged_bytes = 0  # storage bytes of the last save
        self._allocated = [0, 0.0]  # bytes and seconds of host buffers allocated during the last save

    # -- DeepSpeed's interface ------------------------------------------------------------

    def create(self, info: CheckpointCommitInfo) -> None:
        if self._pending:
            raise RuntimeError(f"checkpoint {info.tag}: the previous save's files are not written yet")
        self.staged_bytes, self._allocated = 0, [0, 0.0]

    def save(self, state_dict, path: str) -> None:
        self._pending.append((self._stage(state_dict, os.path.basename(path)), path))

    def commit(self, info: CheckpointCommitInfo) -> bool:
        if self.pinned:
            torch.cuda.current_stream(self.device).synchronize()  # the staged copies are complete
        if self._allocated[0]:  # the first save (or a new shape): the buffers it allocated
            log.info(
                "checkpoint %s: staged %.2f GB in host memory; %.2f GB of %s buffers allocated in %.1f s",
                info.tag,
                self.staged_bytes / 1e9,
                self._allocated[0] / 1e9,
                "page-locked" if self.pinned else "host",
                self._allocated[1],
            )
        return True

    def load(self, path: str, map_location=None):
        # DeepSpeed's files are pickles of Python objects: weights_only cannot read them.
        return torch.load(path, map_location=map_location, weights_only=False)

    def preserves_storage_sharing(self) -> bool:
        return False  # staging copies the state already: DeepSpeed need not clone it first (MoE paths only)

    # -- writing --------------------------------------------------------------------------

    def write_pending(self) -> list[str]:
        """Write the staged files (any thread); returns their paths."""
        pending, self._pending = self._pending, []
        for state, path in pending:
            with writing(path):
                torch.save(state, path, _use_new_zipfile_serialization=self.zipfile_serialization)
        return [path for _, path in pending]

    # -- staging --------------------------------------------------------------------------

    @torch.no_grad()
    def _stage(self, state, name: str):
        """A copy of `state` whose tensors live in this engine's host buffers.

        Storage by storage, as torch.save writes them: each storage the state
        refers to is copied once, whole, and every tensor becomes the same
        view (offset, shape, strides) of its storage's copy.  Tensors that
        share storage (a tied weight under two names) still share it, so the
        file holds what DeepSpeed's own engine would have written."""
        old, new = self._buffers.get(name, []), []
        storages: dict[int, torch.Tensor] = {}  # a live storage (its StorageImpl, as torch.save keys it) -> copy
        memo: dict = {}  # deepcopy's: id(live tensor) -> its staged view, and whatever deepcopy adds

        def stage_storage(t: torch.Tensor) -> torch.Tensor:
            live = t.untyped_storage()
            if live._cdata in storages:  # not data_ptr: every empty storage has data_ptr 0
                return storages[live._cdata]
            i, nbytes = len(new), live.nbytes()
            buf = old[i] if i < len(old) and old[i].numel() == nbytes else None
            if buf is None:
                t0 = time.perf_counter()
                buf = torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=self.pinned)
                self._allocated[0] += nbytes
                self._allocated[1] += time.perf_counter() - t0
            whole = torch.empty(0, dtype=torch.uint8, device=t.device).set_(live)  # the storage's bytes
            buf.copy_(whole, non_blocking=self.pinned)
            new.append(buf)
            self.staged_bytes += nbytes
            storages[live._cdata] = buf
            return buf

        def stage_tensor(t: torch.Tensor) -> torch.Tensor:
            buf = stage_storage(t)
            view = torch.empty(0, dtype=t.dtype).set_(buf.untyped_storage(), t.storage_offset(), t.size(), t.stride())
            if isinstance(t, torch.nn.Parameter):
                view = torch.nn.Parameter(view, requires_grad=t.requires_grad)
            else:
                view.requires_grad_(t.requires_grad)
            if t.__dict__:  # Python attributes torch.save keeps (DeepSpeed's ds_id on its flat groups)
                view.__dict__.update(copy.deepcopy(t.__dict__, memo))
            return view

        def walk(x) -> None:
            if isinstance(x, torch.Tensor):
                if id(x) not in memo and x.layout == torch.strided and x.device.type != "meta":
                    memo[id(x)] = stage_tensor(x)
            elif isinstance(x, dict):
                for v in x.values():
                    walk(v)
            elif isinstance(x, (list, tuple)):
                for v in x:
                    walk(v)

        walk(state)
        self._buffers[name] = new
        # Everything else is deep-copied; a staged tensor is taken from the memo.  (A tensor hidden
        # inside some other object, or not strided, is cloned by deepcopy on its own device: still a copy.)
        return copy.deepcopy(state, memo)
