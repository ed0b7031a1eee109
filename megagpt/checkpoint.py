"""Verified checkpoints: <run.dir>/checkpoints/step_<N>/.

A save writes into `step_<N>.partial/`: DeepSpeed's state (ZeRO shards of
parameters and optimizer, scheduler), one `rng_rank<R>.pt` per rank (tensors
only, read with weights_only=True) and the tokenizer.  Then every file is
hashed (the ranks share the work), `manifest.json` records each file's size
and sha256, `megagpt_state.json` (step, tokens seen, data position, W&B run
id, resolved config, the model's exact shape, and the manifest's own sha256)
is written last, and the directory is renamed to `step_<N>`: a directory of
that name is complete by construction.  The `latest` file names the newest
committed checkpoint and changes only after the rename.

On resume the newest checkpoint is verified against its manifest; a damaged
one (truncated, altered, a file missing) is reported, renamed
`step_<N>.damaged`, and the previous one is tried.  `keep_last` prunes old
checkpoints after each commit: it keeps the highest steps, and never the one
just committed.

With `async_commit`, writing, hashing and committing run in a background
thread.  Training waits for the engine to stage its state in host memory
(`TrainEngine.save` returns a function that writes it: staged_save.py), for
the RNG files and the tokenizer, and for the previous save's commit.

DeepSpeed's files are pickles: never load a checkpoint from a source you do
not trust.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time

import torch

from megagpt.atomic import fsync_dir, write_json, write_text

STATE_FILE = "megagpt_state.json"
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
LATEST_FILE = "latest"
PARTIAL = ".partial"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_DAMAGED_DIR = re.compile(r"^step_(\d+)\.damaged-\d+$")
log = logging.getLogger("megagpt")


class CheckpointError(RuntimeError):
    pass


def _files(partial: str) -> list[str]:
    """The checkpoint's files under `partial`, relative, without the hash shares."""
    found = (os.path.relpath(p, partial) for p in glob.glob(os.path.join(partial, "**"), recursive=True)
             if os.path.isfile(p))
    return [rel for rel in found if not os.path.basename(rel).startswith(".hashes_rank")]


def _manifest_entry(partial: str, rel: str) -> dict:
    """{"bytes", "sha256"} of a file, made durable first (fsync)."""
    return dict(zip(("bytes", "sha256"), sha256_file(os.path.join(partial, rel), sync=True)))


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step}")


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of committed checkpoints under root, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


# -- verification -------------------------------------------------------------------------

def sha256_file(path: str, sync: bool = False) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
            n += len(chunk)
        if sync:
            os.fsync(f.fileno())  # the bytes are on disk before the checkpoint is committed
    return n, h.hexdigest()


def verify(path: str) -> str | None:
    """None if the checkpoint at `path` is intact, else what is wrong."""
    try:
        state = load_state(path)
    except CheckpointError as e:
        return str(e)
    expected = state.get("manifest_sha256")
    if expected is None:
        return None  # written before manifests existed: nothing to check against
    mpath = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(mpath):
        return f"{MANIFEST_FILE} is missing"
    if sha256_file(mpath)[1] != expected:
        return f"{MANIFEST_FILE} does not match its checksum"
    with open(mpath) as f:
        files = json.load(f)["files"]
    for rel, meta in sorted(files.items()):
        fpath = os.path.join(path, rel)
        if not os.path.isfile(fpath):
            return f"{rel} is missing"
        size = os.path.getsize(fpath)
        if size != meta["bytes"]:
            return f"{rel} has {size} bytes, the manifest says {meta['bytes']} (truncated?)"
        if sha256_file(fpath)[1] != meta["sha256"]:
            return f"{rel} does not match its sha256 (corrupt)"
    return None


def resolve_resume(resume: str, root: str) -> str | None:
    """The checkpoint directory to resume from, or None to start fresh.
    `auto`: the newest checkpoint that verifies; damaged ones newer than it
    are reported and set aside as step_<N>.damaged-<time>.  None only where
    root holds no checkpoint at all: if it holds some and none verifies
    (including ones set aside by an earlier start), nothing is renamed and
    CheckpointError lists each with the reason (`trainer.resume=never`
    starts over on purpose).  Call on one rank (it renames) and share the
    answer."""
    if resume == "never":
        return None
    if resume == "auto":
        intact, refused = None, []  # newest first, verified up to the first intact one
        for _, path in reversed(complete_checkpoints(root)):
            problem = verify(path)
            if problem is None:
                intact = path
                break
            refused.append((path, problem))
        if intact is None:
            refused += [(path, "set aside as damaged by an earlier start") for path in set_aside(root)]
            if refused:
                listed = "; ".join(f"{os.path.basename(path)}: {problem}" for path, problem in refused)
                raise CheckpointError(f"trainer.resume=auto: {root} holds {len(refused)} checkpoint(s) and none "
                                      f"verifies ({listed}); not starting over: repair or remove them, resume "
                                      "from a path (trainer.resume=PATH), or start over with trainer.resume=never")
            return None
        for path, problem in refused:
            aside = f"{path}.damaged-{int(time.time())}"
            log.warning("checkpoint %s is damaged (%s); set aside as %s, using %s", path, problem,
                        os.path.basename(aside), os.path.basename(intact))
            os.rename(path, aside)
        return intact
    path = os.path.abspath(resume)
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise CheckpointError(f"trainer.resume: {resume} is not a complete megagpt checkpoint "
                              f"(no {STATE_FILE})")
    problem = verify(path)
    if problem:
        raise CheckpointError(f"trainer.resume: checkpoint {resume} is damaged: {problem}")
    return path


def set_aside(root: str) -> list[str]:
    """The checkpoints an earlier start set aside as damaged (step_<N>.damaged-<time>), oldest first."""
    if not os.path.isdir(root):
        return []
    return sorted((os.path.join(root, n) for n in os.listdir(root) if _DAMAGED_DIR.match(n)),
                  key=lambda p: int(_DAMAGED_DIR.match(os.path.basename(p)).group(1)))


# -- saving ---------------------------------------------------------------------------------

class Checkpointer:
    """Writes verified checkpoints under `root`; collective (every rank calls save)."""

    def __init__(self, root: str, rank: int, world_size: int, keep_last: int = 0, async_commit: bool = False,
                 tokenizer: bytes | None = None):
        self.root, self.rank, self.world = root, rank, world_size
        self.keep_last, self.async_commit = keep_last, async_commit
        self.tokenizer = tokenizer  # the data's tokenizer.json (rank 0): export needs nothing but the checkpoint
        self._thread: threading.Thread | None = None
        self._timing: dict = {}
        self._error: BaseException | None = None
        self.blocked = 0.0  # seconds training waited for saves, in total
        self.last_blocked = 0.0  # ... for the last save
        self.last_waited_for_previous = 0.0  # the part of last_blocked spent waiting for the previous commit
        self.saved_step = -1  # the step of the last save (or of the checkpoint a rollback went back to)
        if rank == 0:
            os.makedirs(root, exist_ok=True)
            for stale in glob.glob(os.path.join(root, f"step_*{PARTIAL}")):
                shutil.rmtree(stale, ignore_errors=True)  # a save killed midway: never committed

    def save(self, engine, step: int, state: dict, rng) -> str:
        """`engine` writes its own files (engine.TrainEngine.save), `state` is
        what megagpt_state.json holds (state.Snapshot), `rng` this rank's
        generators (state.RngState)."""
        import torch.distributed as dist

        t0 = time.perf_counter()
        self.wait()  # the previous commit first: commits happen in step order
        self.last_waited_for_previous = time.perf_counter() - t0
        self._timing = {}  # this save's write and hash times, for the log
        tag = f"step_{step}"
        partial = os.path.join(self.root, tag + PARTIAL)
        if self.rank == 0 and os.path.isdir(partial):
            shutil.rmtree(partial)
        dist.barrier()
        write_staged = engine.save(self.root, tag + PARTIAL)  # a function to call where the save is staged
        own = [f"rng_rank{self.rank}.pt"]
        torch.save(rng.state_dict(), os.path.join(partial, own[0]))
        if self.rank == 0 and self.tokenizer is not None:
            with open(os.path.join(partial, TOKENIZER_FILE), "wb") as f:
                f.write(self.tokenizer)
            own.append(TOKENIZER_FILE)
        dist.barrier()  # every rank's files are written (or staged)
        if self.async_commit:
            self._thread = threading.Thread(target=self._commit_guarded, args=(partial, tag, write_staged, own, state),
                                            name="megagpt-commit", daemon=True)
            self._thread.start()
        else:
            self._commit(partial, tag, self._share(partial, write_staged, own), state)
            dist.barrier()  # committed before anyone goes on
        self.last_blocked = time.perf_counter() - t0
        self.blocked += self.last_blocked
        self.saved_step = step
        return os.path.join(self.root, tag)

    def wait(self) -> None:
        """Until the last save is committed; raises if committing it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            raise CheckpointError(f"committing a checkpoint failed: {type(e).__name__}: {e}")

    def _share(self, partial: str, write_staged, own: list[str]) -> list[str]:
        """The files this rank hashes: what it wrote itself, writing the staged
        files now; or, with nothing staged, every world-th file."""
        if write_staged is not None:
            t0 = time.perf_counter()
            written = write_staged()
            self._timing["write_s"] = time.perf_counter() - t0
            return own + [os.path.relpath(p, partial) for p in written]
        return sorted(_files(partial))[self.rank :: self.world]

    def _commit_guarded(self, partial: str, tag: str, write_staged, own: list[str], state: dict) -> None:
        try:
            self._commit(partial, tag, self._share(partial, write_staged, own), state)
        except BaseException as e:  # noqa: BLE001 - reported by wait()
            self._error = e

    def _commit(self, partial: str, tag: str, mine: list[str], state: dict) -> None:
        """Hash this rank's share of the files; rank 0 gathers the shares
        (through the shared filesystem, so no collective is needed and it can
        run in a thread), hashes any file no share covers, writes manifest and
        state, and renames."""
        t0 = time.perf_counter()
        hashes = {rel: _manifest_entry(partial, rel) for rel in mine}
        self._timing.update(hash_s=time.perf_counter() - t0, hashed_bytes=sum(h["bytes"] for h in hashes.values()))
        write_json(os.path.join(partial, f".hashes_rank{self.rank}.json"), hashes, fsync=True)
        if self.rank != 0:
            return
        manifest: dict = {}
        for r in range(self.world):
            share = os.path.join(partial, f".hashes_rank{r}.json")
            while not os.path.exists(share):  # written with an atomic rename, after the rank's files
                time.sleep(0.05)
            with open(share) as f:
                manifest.update(json.load(f))
        for rel in sorted(set(_files(partial)) - set(manifest)):  # written outside the shares (DeepSpeed's script)
            manifest[rel] = _manifest_entry(partial, rel)
        write_json(os.path.join(partial, MANIFEST_FILE), {"files": manifest}, fsync=True)
        state = {**state, "manifest_sha256": sha256_file(os.path.join(partial, MANIFEST_FILE))[1]}
        write_json(os.path.join(partial, STATE_FILE), state, fsync=True)
        for r in range(self.world):
            os.remove(os.path.join(partial, f".hashes_rank{r}.json"))
        final = os.path.join(self.root, tag)
        if os.path.isdir(final):  # the same step saved again (after a rollback): the new one wins
            shutil.rmtree(final)
        os.rename(partial, final)
        write_text(os.path.join(self.root, LATEST_FILE), tag + "\n")
        fsync_dir(self.root)
        self._prune(keep=final)
        t = self._timing
        written = f"written in {t['write_s']:.1f} s, " if "write_s" in t else ""
        log.info("checkpoint %s committed: rank 0's files %.2f GB, %shashed (sha256) and fsynced in %.1f s "
                 "(%.2f GB/s)", tag, t["hashed_bytes"] / 1e9, written, t["hash_s"],
                 t["hashed_bytes"] / 1e9 / max(t["hash_s"], 1e-9))

    def _prune(self, keep: str) -> None:
        """Keep the `keep_last` highest steps, and always `keep`, the one just
        committed: after `trainer.resume=never` or a resume from an older PATH
        the run.dir may hold higher steps of an earlier run."""
        if self.keep_last <= 0:
            return
        found = complete_checkpoints(self.root)
        for _, path in found[: max(0, len(found) - self.keep_last)]:
            if os.path.abspath(path) != os.path.abspath(keep):
                shutil.rmtree(path, ignore_errors=True)


# -- loading --------------------------------------------------------------------------------

def load_state(path: str) -> dict:
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {STATE_FILE}: {e}") from None


def universal_copy(path: str, saved_world: int, world: int) -> str:
    """The checkpoint at `path` converted (once, by rank 0) to DeepSpeed's
    universal format, which loads on any number of ranks: ZeRO shards are
    consolidated per parameter (weights and both Adam moments) and
    re-partitioned on load.  Returns the directory to load from."""
    root, tag = os.path.split(path.rstrip("/"))
    out = os.path.join(root, "universal", tag)
    if not os.path.isfile(os.path.join(out, ".complete")):
        import subprocess
        import sys

        log.info("converting %s (%d ranks) to DeepSpeed's universal format for %d ranks", path, saved_world, world)
        shutil.rmtree(out, ignore_errors=True)
        r = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", path,
                            "--output_folder", out, "--num_extract_workers", "1", "--num_merge_workers", "1"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
            if "universal_checkpoint_info" in tail[0]:  # written before build_engine recorded it
                raise CheckpointError(f"trainer.resume: cannot reshard {path} from {saved_world} to {world} ranks: "
                                      "it was written without DeepSpeed's universal-checkpoint info (by an older "
                                      f"megagpt); resume it on {saved_world} ranks")
            raise CheckpointError(f"trainer.resume: cannot reshard {path} from {saved_world} to {world} ranks "
                                  f"(DeepSpeed ds_to_universal failed: {tail[0]})")
        open(os.path.join(out, ".complete"), "w").close()
    return out


def restore(path: str, *, engine=None, rng=None, snapshot=None, env=None, seed: int = 0) -> dict:
    """Load the checkpoint at `path` into the parts given and return what its
    megagpt_state.json holds.  One path for every use: a resume restores all
    parts, a rollback the engine and the RNG (the data goes on, the train
    state rewinds its step), export none (it reads the state and consolidates
    the weights itself).  Collective when an engine is given.

    ZeRO-0 state is whole and loads on any number of ranks; ZeRO-1..3 shards
    written by another number of ranks go through their universal copy
    (converted once, by rank 0).  On another number of ranks the saved
    per-rank RNG states do not map onto the new ranks: the RNG is reseeded,
    deterministically."""
    from megagpt import collectives

    state = load_state(path)
    if engine is not None:
        saved_world = state.get("world_size", env.world_size)
        source, universal = path, False
        if engine.zero_stage > 0 and saved_world != env.world_size:
            outcome = None
            if env.is_main:
                try:
                    outcome = (universal_copy(path, saved_world, env.world_size), None)
                except CheckpointError as e:
                    outcome = (None, str(e))
            source, error = collectives.broadcast_from_main(outcome)
            if error:
                raise CheckpointError(error)
            universal = True
        root, tag = os.path.split(source.rstrip("/"))
        if not engine.load(root, tag, universal=universal):
            raise CheckpointError(f"checkpoint {path}: DeepSpeed found no state to load")
        if rng is not None:
            rng_file = os.path.join(path, f"rng_rank{env.rank}.pt")
            if os.path.exists(rng_file) and saved_world == env.world_size:
                rng.load_state_dict(torch.load(rng_file, weights_only=True))
            else:
                rng.reseed(seed, env.rank, state["step"])
    if snapshot is not None:
        snapshot.load_state_dict(state)
    return state
