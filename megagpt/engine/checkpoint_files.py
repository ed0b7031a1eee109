"""DeepSpeed's checkpoint files, read offline: a checkpoint's copy in DeepSpeed's
universal format (to load it on another number of ranks) and the whole
model's fp32 weights (for export).  Nothing outside the engine knows these
files' names or layout: `TrainEngine.save` writes them into a checkpoint
directory, and the rest of megagpt only hashes and verifies them as files.

DeepSpeed's files are pickles: read only checkpoints you trust.
"""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import os
import shutil

import torch

log = logging.getLogger("megagpt")


class EngineStateError(RuntimeError):
    """The engine's state in a checkpoint cannot be loaded or read; one line
    (checkpoint.py and export.py report it as their CheckpointError)."""


def universal_copy(path: str, saved_world: int, world: int) -> str:
    """The checkpoint at `path` converted (once) to DeepSpeed's universal
    format, which loads on any number of ranks: ZeRO shards are consolidated
    per parameter (weights and both Adam moments) and re-partitioned on load.
    The copy goes beside the checkpoints, `<root>/universal/<tag>`, marked
    complete by `.complete`.  Returns the directory to load from."""
    root, tag = os.path.split(path.rstrip("/"))
    out = os.path.join(root, "universal", tag)
    if not os.path.isfile(os.path.join(out, ".complete")):
        import subprocess
        import sys

        log.info("converting %s (%d ranks) to DeepSpeed's universal format for %d ranks", path, saved_world, world)
        shutil.rmtree(out, ignore_errors=True)
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "deepspeed.checkpoint.ds_to_universal",
                "--input_folder",
                path,
                "--output_folder",
                out,
                "--num_extract_workers",
                "1",
                "--num_merge_workers",
                "1",
            ],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise EngineStateError(
                f"cannot reshard {path} from {saved_world} to {world} ranks (DeepSpeed "
                f"ds_to_universal failed: {tail[0]}); resume it on {saved_world} ranks"
            )
        open(os.path.join(out, ".complete"), "w").close()
    return out


def consolidated_weights(path: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights (megagpt's names) from the engine's files
    in checkpoint directory `path`, written under ZeRO stage `zero_stage`:
    DeepSpeed's zero_to_fp32 for stages 1-3, the module state for stage 0.
    On CPU, in this process, without a process group."""
    try:
        # zero_to_fp32 prints its progress and draws progress bars.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            if zero_stage == 0:
                files = glob.glob(os.path.join(path, "mp_rank_*_model_states.pt"))
                if not files:
                    raise FileNotFoundError("no mp_rank_*_model_states.pt")
                # DeepSpeed's own pickle (see the module doc on trust).
                weights = torch.load(sorted(files)[0], map_location="cpu", weights_only=False)["module"]
            else:
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                root, tag = os.path.split(path.rstrip("/"))
                weights = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    except Exception as e:  # noqa: BLE001 - truncated pickles, missing shards, shape mismatches
        msg = str(e).splitlines()[0] if str(e) else ""
        raise EngineStateError(
            f"cannot consolidate the ZeRO-{zero_stage} shards (damaged or incomplete?): {type(e).__name__}: {msg}"
        ) from None
    return {k: v.float() for k, v in weights.items()}
