"""`python -m megagpt.export --checkpoint DIR --out DIR`: a Hugging Face folder
from a megagpt checkpoint.

DIR may be a checkpoint (`.../checkpoints/step_N`), a checkpoints folder or a
run directory.  A checkpoint is read only once it verifies against its
manifest (checkpoint.verify, as a resume does).  Given a run or checkpoints
folder, export takes the newest checkpoint that verifies and says on stderr
which newer ones it skipped and why; it only reads them (setting damaged ones
aside is training's job).  A checkpoint named explicitly that is damaged stops
the export with the reason.  The engine consolidates its files into the
whole model's fp32 weights, offline (engine.consolidated_weights); they are
renamed for the family's transformers class (megagpt/hf) and written as:

  config.json, generation_config.json, model.safetensors (or
  model-0000i-of-0000n.safetensors + model.safetensors.index.json when larger
  than --max-shard-bytes), tokenizer.json, tokenizer_config.json,
  special_tokens_map.json, megagpt_export.json (the checkpoint, step, tokens)

The folder is written as `<out>.partial-<pid>` beside --out and renamed to
--out at the end: a failed export removes it and leaves --out as it was.  An
existing --out is replaced when it is empty or an earlier export (it holds
megagpt_export.json), any other folder only with --overwrite.  Never written
to or replaced, --overwrite or not: a checkpoint or a folder inside one, a
run's checkpoints folder or a folder inside it, a folder that holds
checkpoints or the checkpoint being read.

Loading the engine's files (DeepSpeed's) unpickles them: export only
checkpoints you trust.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import sys
from functools import partial

import torch

from megagpt.atomic import fsync_dir, write_json
from megagpt.checkpoint import (
    CHECKPOINT_MANIFEST,
    LATEST_FILE,
    STATE_FILE,
    CheckpointError,
    complete_checkpoints,
    load_state,
    newest_verified,
    problem_of,
)
from megagpt.data.tokenizer import TOKENIZER_FILE
from megagpt.model.config import GPTConfig
from megagpt.model.families import FAMILIES
from megagpt.model.gpt import GPT

_write_json = partial(write_json, indent=2)  # exported JSON as transformers writes it
EXPORT_RECORD = "megagpt_export.json"  # marks a folder as an export, which a later export may replace
_CHECKPOINT_ENTRY = re.compile(r"^step_\d+($|\.)")  # step_N, step_N.partial, step_N.damaged-<time>
_RUN_CONFIG = "config.yaml"  # in <run.dir>, beside checkpoints/


def find_checkpoint(path: str) -> str:
    """The verified checkpoint directory DIR names (see the module doc); the
    newer damaged ones it skipped are reported on stderr."""
    found, skipped = resolve_checkpoint(path)
    for damaged, problem in skipped:
        print(
            f"megagpt: checkpoint {damaged} is damaged ({problem}); using {os.path.basename(found)}",
            file=sys.stderr,
            flush=True,
        )
    return found


def resolve_checkpoint(path: str) -> tuple[str, list[tuple[str, str]]]:
    """(the verified checkpoint directory DIR names, [(newer damaged checkpoint, what is wrong)])."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path}: no such directory")
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        problem = problem_of(path)
        if problem is not None:  # named explicitly: never another one instead
            raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
        return path, []
    for root in (path, os.path.join(path, "checkpoints")):
        if complete_checkpoints(root):
            found, skipped = newest_verified(root)
            if found is None:
                each = "; ".join(f"{os.path.basename(p)}: {problem}" for p, problem in skipped)
                raise CheckpointError(f"checkpoint {root}: no checkpoint here verifies ({each})")
            return found, skipped
    if os.path.basename(path).startswith("step_"):
        raise CheckpointError(f"checkpoint {path}: incomplete (no {STATE_FILE}; the save did not finish)")
    raise CheckpointError(f"checkpoint {path}: no complete megagpt checkpoint here or under checkpoints/")


# -- where an export may go -------------------------------------------------------------------


def check_out(out: str, overwrite: bool = False) -> None:
    """Raise a one-line CheckpointError when exporting into `out` could damage a
    checkpoint or replace a folder that is not an earlier export (`overwrite`:
    any folder but those of checkpoints)."""
    real = os.path.realpath(out)
    place = real
    while True:  # `out` and every folder above it
        what = _checkpoint_place(place)
        if what is not None:
            where = "it is" if place == real else "it is inside"
            raise CheckpointError(
                f"cannot export to {out}: {where} {what} {place}; an export is a folder of its own (e.g. <run.dir>/hf)"
            )
        if os.path.dirname(place) == place:
            break
        place = os.path.dirname(place)
    if not os.path.lexists(real):
        return
    if not os.path.isdir(real):
        raise CheckpointError(f"cannot export to {out}: it exists and is not a folder")
    if not os.listdir(real):
        return
    held = _checkpoint_below(real)  # walks what replacing it would delete (the checkpoint being read too)
    if held is not None:
        raise CheckpointError(f"cannot export to {out}: it holds {held}")
    if not overwrite and not os.path.isfile(os.path.join(real, EXPORT_RECORD)):
        raise CheckpointError(
            f"cannot export to {out}: it exists and is not a megagpt export (no {EXPORT_RECORD}); "
            "give a new or empty folder, or --overwrite to replace it"
        )


def _checkpoint_place(folder: str) -> str | None:
    """What `folder` is, when it is a checkpoint or a run's checkpoints folder:
    one with `latest` (every commit writes it), or <run.dir>/checkpoints before
    its first commit.  A folder that merely holds a copied step_N is neither:
    an export beside the copy cannot harm it."""
    if not os.path.isdir(folder):
        return None
    if any(os.path.isfile(os.path.join(folder, name)) for name in (STATE_FILE, CHECKPOINT_MANIFEST)):
        return "the megagpt checkpoint"
    if os.path.isfile(os.path.join(folder, LATEST_FILE)) or (
        os.path.basename(folder) == "checkpoints"
        and (
            os.path.isfile(os.path.join(os.path.dirname(folder), _RUN_CONFIG))
            or any(_CHECKPOINT_ENTRY.match(name) for name in _names(folder))
        )
    ):
        return "the run's checkpoints folder"
    return None


def _names(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:  # unreadable: nothing megagpt wrote
        return []


def _checkpoint_below(folder: str) -> str | None:
    """A checkpoint or checkpoints folder somewhere under `folder`, described."""
    for here, dirs, _ in os.walk(folder):
        for name in dirs:
            what = _checkpoint_place(os.path.join(here, name))
            if what is not None:
                return f"{what} {os.path.join(here, name)}"
    return None


# -- reading a checkpoint ---------------------------------------------------------------------


def model_config(state: dict, path: str) -> GPTConfig:
    m = state.get("model")
    if not isinstance(m, dict):
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} has no model description")
    if m.get("family") not in FAMILIES:
        raise CheckpointError(
            f"checkpoint {path}: unknown model family {m.get('family')!r}; megagpt knows {tuple(FAMILIES)}"
        )
    try:
        return GPTConfig.from_record(m)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: bad model description: {e}") from None


def consolidated_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights from the engine's files in checkpoint `path`."""
    from megagpt.engine import EngineStateError, consolidated_weights

    try:
        return consolidated_weights(path, _zero_stage(path))
    except EngineStateError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None


def _zero_stage(path: str) -> int:
    state = load_state(path)
    stage = (state.get("config") or {}).get("deepspeed", {}).get("zero_stage")
    if stage is None:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} does not say which ZeRO stage wrote it")
    return int(stage)


def load_model(path: str, attention: str = "sdpa") -> tuple[GPT, dict]:
    """(model in eval mode on CPU, megagpt state) from DIR (see the module doc)."""
    return load_checkpoint_model(find_checkpoint(path), attention)


def load_checkpoint_model(path: str, attention: str = "sdpa") -> tuple[GPT, dict]:
    """(model in eval mode on CPU, megagpt state) from the checkpoint directory
    `path`, verified already by find_checkpoint (verifying hashes every file)."""
    state = load_state(path)
    cfg = model_config(state, path).for_inference(attention)
    model = GPT(cfg)
    sd = consolidated_state_dict(path)
    if cfg.tie_embeddings:
        sd.setdefault("lm_head.weight", sd.get("wte.weight"))
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    wrong = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or wrong:
        raise CheckpointError(
            f"checkpoint {path}: weights do not match the model description "
            f"(missing {missing[:3]}, wrong shape {wrong[:3]})"
        )
    model.load_state_dict({k: sd[k] for k in expected})
    return model.eval(), state


# -- writing the export -----------------------------------------------------------------------


def export(checkpoint: str, out: str, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> str:
    """Write the Hugging Face folder from DIR `checkpoint`; returns its path."""
    check_out(out, overwrite)  # before verifying, which hashes every file
    return export_checkpoint(find_checkpoint(checkpoint), out, max_shard_bytes, overwrite)


def export_checkpoint(path: str, out: str, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> str:
    """Write the Hugging Face folder from the verified checkpoint directory
    `path` into a temporary folder beside `out` and rename it to `out`."""
    out = os.path.abspath(out)
    check_out(out, overwrite)  # before the minutes a large model takes to consolidate
    model, state = load_checkpoint_model(path)
    c = model.cfg
    real = os.path.realpath(out)  # a link to a folder: the folder is replaced, the link kept
    os.makedirs(os.path.dirname(real), exist_ok=True)
    tmp = f"{real}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # this process id's, left by a killed export
    try:
        write_hf_model(model, tmp, c.eod_id, max_shard_bytes)
        _write_tokenizer(path, tmp, c.max_seq_len)
        _write_json(
            os.path.join(tmp, EXPORT_RECORD),
            {"checkpoint": path, "step": state.get("step"), "tokens_seen": state.get("tokens_seen")},
        )
        check_out(out, overwrite)  # again: `out` may have changed meanwhile
        _put_in_place(tmp, real)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _put_in_place(tmp: str, out: str) -> None:
    """Rename the complete folder `tmp` to `out`, replacing what is there (check_out allowed it)."""
    if os.path.isdir(out) and os.listdir(out):
        old = f"{out}.old-{os.getpid()}"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)  # over an empty folder too
    fsync_dir(os.path.dirname(out))


def write_hf_model(model: GPT, out: str, eos_id: int | None = None, max_shard_bytes: int = 5 * 2**30) -> str:
    """Write a model in memory as a Hugging Face folder, the tokenizer aside:
    the weights (fp32), config.json and generation_config.json.  Returns `out`."""
    from safetensors.torch import save_file

    from megagpt.hf import hf_config, to_hf

    c = model.cfg
    tensors = to_hf(model.state_dict(), c)
    if c.tie_embeddings:  # transformers re-ties the head; safetensors refuses shared storage anyway
        tensors.pop("lm_head.weight")
    os.makedirs(out, exist_ok=True)
    _write_weights(tensors, out, max_shard_bytes, save_file)
    _write_json(os.path.join(out, "config.json"), hf_config(c, eos_id))
    _write_json(
        os.path.join(out, "generation_config.json"),
        {
            "bos_token_id": eos_id,
            "eos_token_id": eos_id,
            "pad_token_id": eos_id,
            "do_sample": False,
            "max_length": c.max_seq_len,
        },
    )
    return out


def _write_weights(tensors: dict, out: str, max_shard_bytes: int, save_file) -> None:
    for old in glob.glob(os.path.join(out, "model*.safetensors*")):
        os.remove(old)  # a previous export's shards must not mix with these
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(tensors, os.path.join(out, "model.safetensors"), metadata=meta)
        return
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, os.path.join(out, fname), metadata=meta)
        for n in names:
            weight_map[n] = fname
            total += tensors[n].numel() * tensors[n].element_size()
    _write_json(
        os.path.join(out, "model.safetensors.index.json"), {"metadata": {"total_size": total}, "weight_map": weight_map}
    )


def _write_tokenizer(path: str, out: str, max_len: int) -> None:
    src = os.path.join(path, TOKENIZER_FILE)
    if not os.path.isfile(src):
        # Training writes it into every checkpoint, unless it could not read the data's (a warning then).
        raise CheckpointError(f"checkpoint {path}: no {TOKENIZER_FILE} (training could not read the data's tokenizer)")
    from megagpt.data.tokenizer import eod_id, load_tokenizer

    try:
        tok = load_tokenizer(src)
        eos = tok.id_to_token(eod_id(tok, src))
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {TOKENIZER_FILE}: {e.__cause__ or e}") from None
    with open(src, "rb") as f, open(os.path.join(out, TOKENIZER_FILE), "wb") as g:
        g.write(f.read())
    _write_json(
        os.path.join(out, "tokenizer_config.json"),
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": max_len,
            "bos_token": eos,
            "eos_token": eos,
            "unk_token": eos,
            "pad_token": eos,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        },
    )
    _write_json(
        os.path.join(out, "special_tokens_map.json"),
        {"bos_token": eos, "eos_token": eos, "unk_token": eos, "pad_token": eos},
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m megagpt.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, checkpoints dir or run dir")
    p.add_argument("--out", required=True, help="folder to write the Hugging Face model into")
    p.add_argument("--max-shard-bytes", type=int, default=5 * 2**30)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out that is not an earlier export (never one of checkpoints)",
    )
    args = p.parse_args(argv)
    try:
        check_out(args.out, args.overwrite)  # before verifying, which hashes every file
        path = find_checkpoint(args.checkpoint)
        out = export_checkpoint(path, args.out, args.max_shard_bytes, args.overwrite)
    except CheckpointError as e:
        print(f"megagpt.export: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # writing: a full disk, no permission
        print(f"megagpt.export: error: cannot write {args.out}: {e}", file=sys.stderr)
        return 2
    print(f"exported {path} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
