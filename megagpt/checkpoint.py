"""Verified checkpoints: <run.dir>/checkpoints/step_<N>/.

A save writes into `step_<N>.partial/`: the engine's state (its own files:
engine.TrainEngine.save), one `rng_rank<R>.pt` per rank (tensors only, read
with weights_only=True) and the tokenizer.  Then every file is hashed (the
ranks share the work), the checkpoint's `manifest.json` records each file's
size and sha256, `megagpt_state.json` (step, tokens seen, data position, W&B
run id, resolved config, the model's exact shape, and the manifest's own
sha256) is written last, and the directory is renamed to `step_<N>`: a
directory of that name is complete by construction.  The `latest` file names
the newest committed checkpoint and changes only after the rename.

On resume the newest checkpoint is verified against its manifest; a damaged
one (truncated, altered, a file missing, no manifest) is reported, renamed
`step_<N>.damaged`, and the previous one is tried.  `keep_last` prunes old
checkpoints after each commit: it keeps the highest steps, and never the one
just committed.

With `async_commit`, writing, hashing and committing run in a background
thread.  Training waits for the engine to stage its state in host memory
(`TrainEngine.save` returns a function that writes it), for the RNG files
and the tokenizer, and for the previous save's commit.

The engine's files are DeepSpeed's pickles: never load a checkpoint from a
source you do not trust.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import threading
import time

import torch

from megagpt.atomic import WriteFailed, fsync_dir, sha256_file, write_failure, write_json, write_text, writing
from megagpt.data.tokenizer import TOKENIZER_FILE

STATE_FILE = "megagpt_state.json"
# Every file of a checkpoint with its size and sha256.  (Not a dataset's
# manifest.json, data/shards.DATASET_MANIFEST: that one lists shards.)
CHECKPOINT_MANIFEST = "manifest.json"
LATEST_FILE = "latest"
PARTIAL = ".partial"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_DAMAGED_DIR = re.compile(r"^step_(\d+)\.damaged-\d+$")
log = logging.getLogger("megagpt")


class CheckpointError(RuntimeError):
    pass


# Markers of a background commit per rank, inside the partial directory: created
# empty before the commit starts, renamed (no space needed) if it fails there.
_PENDING, _FAILED = ".pending_rank", ".failed_rank"


class _OtherRankFailed(Exception):
    """Rank 0's background commit gave up: another rank's part could not be written."""


def _files(partial: str) -> list[str]:
    """The checkpoint's files under `partial`, relative, without the hash shares and markers."""
    found = (
        os.path.relpath(p, partial) for p in glob.glob(os.path.join(partial, "**"), recursive=True) if os.path.isfile(p)
    )
    return [rel for rel in found if not os.path.basename(rel).startswith((".hashes_rank", _PENDING, _FAILED))]


def _failed_write(e: BaseException, where: str) -> str:
    """One line for a failed write (atomic.write_failure); `where`: the path
    unless the error names its own."""
    return write_failure(where if isinstance(e, WriteFailed) else (getattr(e, "filename", None) or where), e)


def _manifest_entry(partial: str, rel: str) -> dict:
    """{"bytes", "sha256"} of a file, made durable first (fsync: where the disk
    cannot keep what was written, this is where it says so)."""
    with writing(os.path.join(partial, rel)):
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


def verify(path: str) -> str | None:
    """None if the checkpoint at `path` is intact, else what is wrong."""
    try:
        state = load_state(path)
    except CheckpointError as e:
        return str(e)
    expected = state.get("manifest_sha256")
    if expected is None:
        return f"{STATE_FILE} names no manifest checksum (manifest_sha256): nothing to verify against"
    mpath = os.path.join(path, CHECKPOINT_MANIFEST)
    if not os.path.isfile(mpath):
        return f"{CHECKPOINT_MANIFEST} is missing"
    if sha256_file(mpath)[1] != expected:
        return f"{CHECKPOINT_MANIFEST} does not match its checksum"
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


def newest_verified(root: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(the newest checkpoint under `root` that verifies, or None; the newer
    ones that do not, newest first, with what is wrong).  Only reads."""
    refused = []
    for _, path in reversed(complete_checkpoints(root)):
        problem = problem_of(path)
        if problem is None:
            return path, refused
        refused.append((path, problem))
    return None, refused


def problem_of(path: str) -> str | None:
    """verify's answer, without the path it may repeat; a manifest that cannot be read is one too."""
    try:
        problem = verify(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        problem = f"cannot verify it: {type(e).__name__}: {e}"
    return None if problem is None else problem.removeprefix(f"checkpoint {path}: ")


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
        intact, refused = newest_verified(root)
        if intact is None:
            refused += [(path, "set aside as damaged by an earlier start") for path in set_aside(root)]
            if refused:
                listed = "; ".join(f"{os.path.basename(path)}: {problem}" for path, problem in refused)
                raise CheckpointError(
                    f"trainer.resume=auto: {root} holds {len(refused)} checkpoint(s) and none "
                    f"verifies ({listed}); not starting over: repair or remove them, resume "
                    "from a path (trainer.resume=PATH), or start over with trainer.resume=never"
                )
            return None
        for path, problem in refused:
            aside = f"{path}.damaged-{int(time.time())}"
            log.warning(
                "checkpoint %s is damaged (%s); set aside as %s, using %s",
                path,
                problem,
                os.path.basename(aside),
                os.path.basename(intact),
            )
            os.rename(path, aside)
        return intact
    path = os.path.abspath(resume)
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise CheckpointError(f"trainer.resume: {resume} is not a complete megagpt checkpoint (no {STATE_FILE})")
    problem = verify(path)
    if problem:
        raise CheckpointError(f"trainer.resume: checkpoint {resume} is damaged: {problem}")
    return path


def set_aside(root: str) -> list[str]:
    """The checkpoints an earlier start set aside as damaged (step_<N>.damaged-<time>), oldest first."""
    if not os.path.isdir(root):
        return []
    return sorted(
        (os.path.join(root, n) for n in os.listdir(root) if _DAMAGED_DIR.match(n)),
        key=lambda p: int(_DAMAGED_DIR.match(os.path.basename(p)).group(1)),
    )


# -- saving ---------------------------------------------------------------------------------


class Checkpointer:
    """Writes verified checkpoints under `root`; collective (every rank calls save).

    A save that cannot be written (a full disk, a filesystem gone read-only)
    stops every rank with one line (`CheckpointError`) naming the file, the
    space left and the checkpoint that remains the newest; its `.partial`
    directory is removed and `latest` is left alone.  No rank is left waiting
    for another that failed: the ranks agree on the outcome after writing,
    after hashing and after committing (in the background: when the next save
    or the end of training waits for the commit)."""

    def __init__(
        self,
        root: str,
        rank: int,
        world_size: int,
        keep_last: int = 0,
        async_commit: bool = False,
        tokenizer: bytes | None = None,
        files: dict[str, bytes] | None = None,
    ):
        self.root, self.rank, self.world = root, rank, world_size
        self.keep_last, self.async_commit = keep_last, async_commit
        self.tokenizer = tokenizer  # the data's tokenizer.json (rank 0): export needs nothing but the checkpoint
        # More files rank 0 writes into each checkpoint, by relative path: the tokenizer and config
        # files of the folder a run started from (model.init_from), which export writes back.
        self.files = files or {}
        self._thread: threading.Thread | None = None
        self._timing: dict = {}
        self._error: str | None = None  # the background commit's failure on this rank, for wait()
        self._committing: str | None = None  # the tag the background commit works on
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

        from megagpt import collectives

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
        error = engine.take_write_error()
        writing = partial
        try:
            if error is None:
                writing = os.path.join(partial, own[0])
                torch.save(rng.state_dict(), writing)
                if self.rank == 0 and self.tokenizer is not None:
                    writing = os.path.join(partial, TOKENIZER_FILE)
                    with open(writing, "wb") as f:
                        f.write(self.tokenizer)
                    own.append(TOKENIZER_FILE)
                for rel, content in self.files.items() if self.rank == 0 else ():
                    writing = os.path.join(partial, rel)
                    os.makedirs(os.path.dirname(writing), exist_ok=True)
                    with open(writing, "wb") as f:
                        f.write(content)
                    own.append(rel)
                if self.async_commit:  # renamed to .failed_rank<R> if the background commit fails
                    writing = os.path.join(partial, f"{_PENDING}{self.rank}")
                    open(writing, "w").close()
        except (OSError, RuntimeError) as e:
            error = _failed_write(e, writing)
        # Every rank's files are written (or staged), or some rank's failed.
        self._stop_on_failure(tag, collectives.first_message(error))
        if self.async_commit:
            self._committing = tag
            self._thread = threading.Thread(
                target=self._commit_in_background,
                args=(partial, tag, write_staged, own, state),
                name="megagpt-commit",
                daemon=True,
            )
            self._thread.start()
        else:
            self._commit_now(partial, tag, write_staged, own, state)
        self.last_blocked = time.perf_counter() - t0
        self.blocked += self.last_blocked
        self.saved_step = step
        return os.path.join(self.root, tag)

    def wait(self) -> None:
        """Until the last save is committed; raises CheckpointError on every
        rank if committing it failed on any.  Collective with async_commit."""
        from megagpt import collectives

        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.async_commit:
            error, self._error = self._error, None
            tag, self._committing = self._committing, None
            self._stop_on_failure(tag, collectives.first_message(error))

    def _stop_on_failure(self, tag: str | None, error: str | None) -> None:
        """With a failure on some rank (agreed: every rank passes the same
        `error`), remove the save's partial directory and raise on every rank."""
        if error is None:
            return
        partial = os.path.join(self.root, f"{tag}{PARTIAL}")
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # gives back the space it took
        newest = complete_checkpoints(self.root)
        remains = (
            f"the newest checkpoint remains {os.path.basename(newest[-1][1])}"
            if newest
            else "there is no checkpoint yet"
        )
        raise CheckpointError(f"cannot save checkpoint {tag} in {self.root}: {error}; {remains}")

    def _share(self, partial: str, write_staged, own: list[str]) -> list[str]:
        """The files this rank hashes: what it wrote itself, writing the staged
        files now; or, with nothing staged, every world-th file."""
        if write_staged is not None:
            t0 = time.perf_counter()
            written = write_staged()
            self._timing["write_s"] = time.perf_counter() - t0
            return own + [os.path.relpath(p, partial) for p in written]
        return sorted(_files(partial))[self.rank :: self.world]

    def _hash(self, partial: str, mine: list[str]) -> dict:
        t0 = time.perf_counter()
        hashes = {rel: _manifest_entry(partial, rel) for rel in mine}
        self._timing.update(hash_s=time.perf_counter() - t0, hashed_bytes=sum(h["bytes"] for h in hashes.values()))
        return hashes

    def _commit_now(self, partial: str, tag: str, write_staged, own: list[str], state: dict) -> None:
        """Hash this rank's share of the files, gather the shares on rank 0,
        which commits; every rank learns the outcome."""
        from megagpt import collectives

        hashes, error = {}, None
        try:
            hashes = self._hash(partial, self._share(partial, write_staged, own))
        except (OSError, RuntimeError, WriteFailed) as e:
            error = _failed_write(e, partial)
        shares = collectives.gather((hashes, error))
        error = next((e for _, e in shares if e), None)
        if self.rank == 0 and error is None:
            try:
                self._finish(partial, tag, [h for h, _ in shares], state)
            except (OSError, RuntimeError, WriteFailed) as e:
                error = _failed_write(e, partial)
        self._stop_on_failure(tag, collectives.broadcast_from_main(error))

    def _commit_in_background(self, partial: str, tag: str, write_staged, own: list[str], state: dict) -> None:
        """The same, in the commit thread (no collectives there): the shares go
        through the shared filesystem; a rank that fails leaves a marker, so
        that rank 0 stops waiting for its share, and wait() agrees on the error."""
        pending = os.path.join(partial, f"{_PENDING}{self.rank}")
        try:
            hashes = self._hash(partial, self._share(partial, write_staged, own))
            share = os.path.join(partial, f".hashes_rank{self.rank}.json")
            with writing(share):
                write_json(share, hashes, fsync=True)
            os.remove(pending)
            if self.rank == 0:
                self._finish(partial, tag, [self._read_share(partial, r) for r in range(self.world)], state)
        except _OtherRankFailed:
            pass  # that rank reports its own error through wait()
        except BaseException as e:  # noqa: BLE001 - reported by wait(), on every rank
            self._error = _failed_write(e, partial)
            with contextlib.suppress(OSError):
                os.rename(pending, os.path.join(partial, f"{_FAILED}{self.rank}"))  # needs no space

    def _read_share(self, partial: str, rank: int) -> dict:
        share = os.path.join(partial, f".hashes_rank{rank}.json")
        failed = os.path.join(partial, f"{_FAILED}{rank}")
        while not os.path.exists(share):  # written with an atomic rename, after the rank's files
            if os.path.exists(failed):
                raise _OtherRankFailed()
            time.sleep(0.05)
        with open(share) as f:
            return json.load(f)

    def _finish(self, partial: str, tag: str, shares: list[dict], state: dict) -> None:
        """Rank 0: the manifest from every rank's hashes (and any file no share
        covers), the state, the rename, `latest`, pruning."""
        manifest: dict = {}
        for share in shares:
            manifest.update(share)
        for rel in sorted(set(_files(partial)) - set(manifest)):  # written outside the shares (DeepSpeed's script)
            manifest[rel] = _manifest_entry(partial, rel)
        with writing(os.path.join(partial, CHECKPOINT_MANIFEST)):
            write_json(os.path.join(partial, CHECKPOINT_MANIFEST), {"files": manifest}, fsync=True)
        state = {**state, "manifest_sha256": sha256_file(os.path.join(partial, CHECKPOINT_MANIFEST))[1]}
        with writing(os.path.join(partial, STATE_FILE)):
            write_json(os.path.join(partial, STATE_FILE), state, fsync=True)
        for r in range(self.world):
            with contextlib.suppress(FileNotFoundError):  # the shares of a commit in the foreground: none
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
        log.info(
            "checkpoint %s committed: rank 0's files %.2f GB, %shashed (sha256) and fsynced in %.1f s (%.2f GB/s)",
            tag,
            t["hashed_bytes"] / 1e9,
            written,
            t["hash_s"],
            t["hashed_bytes"] / 1e9 / max(t["hash_s"], 1e-9),
        )

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


def restore(path: str, *, engine=None, rng=None, snapshot=None, env=None, seed: int = 0) -> dict:
    """Load the checkpoint at `path` into the parts given and return what its
    megagpt_state.json holds.  One path for every use: a resume restores all
    parts, a rollback the engine and the RNG (the data goes on, the train
    state rewinds its step), export none (it reads the state and has the
    engine's files consolidated).  Collective when an engine is given.

    The engine loads its own files, on this number of ranks or resharded
    (engine.TrainEngine.load).  On another number of ranks the saved
    per-rank RNG states do not map onto the new ranks: the RNG is reseeded,
    deterministically."""
    from megagpt.engine import EngineStateError

    state = load_state(path)
    if engine is not None:
        saved_world = state.get("world_size", env.world_size)
        try:
            engine.load(path, saved_world)
        except EngineStateError as e:
            resharding = saved_world != env.world_size
            raise CheckpointError(f"trainer.resume: {e}" if resharding else str(e)) from None
        if rng is not None:
            rng_file = os.path.join(path, f"rng_rank{env.rank}.pt")
            if os.path.exists(rng_file) and saved_world == env.world_size:
                rng.load_state_dict(torch.load(rng_file, weights_only=True))
            else:
                rng.reseed(seed, env.rank, state["step"])
    if snapshot is not None:
        snapshot.load_state_dict(state)
    return state
