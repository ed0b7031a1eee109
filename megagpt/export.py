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
  than --max-shard-bytes) in --dtype (fp32, bf16 or fp16), tokenizer.json,
  tokenizer_config.json, special_tokens_map.json (hf/tokenizer_files.py: a
  run started from a Hugging Face folder gets that folder's tokenizer files
  and special-token ids, chat template included), README.md (the model card,
  hf/model_card.py), megagpt_export.json (the checkpoint relative to its run,
  the step, the tokens seen)

No absolute local path is written: the checkpoint is named relative to its
run, the source model of a continued pretraining by its folder's name.

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
import dataclasses
import glob
import json
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
from megagpt.export_gguf import GGUF_TYPES, GGUFError, write_gguf
from megagpt.export_gguf import check_target as check_gguf_target
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


# The weights' dtypes: --dtype -> (torch dtype, config.json's name for it).
DTYPES = {"fp32": (torch.float32, "float32"), "bf16": (torch.bfloat16, "bfloat16"), "fp16": (torch.float16, "float16")}


def export(
    checkpoint: str,
    out: str,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    dtype: str = "fp32",
    name: str | None = None,
) -> str:
    """Write the Hugging Face folder from DIR `checkpoint`; returns its path."""
    check_out(out, overwrite)  # before verifying, which hashes every file
    return export_checkpoint(find_checkpoint(checkpoint), out, max_shard_bytes, overwrite, dtype, name)


def export_checkpoint(
    path: str,
    out: str,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    dtype: str = "fp32",
    name: str | None = None,
) -> str:
    """Write the Hugging Face folder from the verified checkpoint directory
    `path` into a temporary folder beside `out` and rename it to `out`.
    `name`: the model's name in the model card (default: the run's folder name)."""
    from megagpt.hf.model_card import public_path
    from megagpt.hf.tokenizer_files import carried_source_files

    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out = os.path.abspath(out)
    check_out(out, overwrite)  # before the minutes a large model takes to consolidate
    model, state = load_checkpoint_model(path)
    tokenizer = _checkpoint_tokenizer(path)
    run_dir = _run_dir_of(path)
    real = os.path.realpath(out)  # a link to a folder: the folder is replaced, the link kept
    os.makedirs(os.path.dirname(real), exist_ok=True)
    tmp = f"{real}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # this process id's, left by a killed export
    try:
        notes = write_export(
            model,
            tmp,
            tokenizer,
            source=carried_source_files(path),
            dtype=dtype,
            max_shard_bytes=max_shard_bytes,
            state=state,
            name=name or os.path.basename(run_dir),
            run_dir=run_dir,
        )
        _write_json(
            os.path.join(tmp, EXPORT_RECORD),
            {
                "checkpoint": public_path(path, run_dir),  # relative to the run
                "name": name or os.path.basename(run_dir),
                "step": state.get("step"),
                "tokens_seen": state.get("tokens_seen"),
                "dtype": dtype,
            },
        )
        check_out(out, overwrite)  # again: `out` may have changed meanwhile
        _put_in_place(tmp, real)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for note in notes:
        print(f"megagpt.export: {note}", file=sys.stderr, flush=True)
    return out


def _run_dir_of(checkpoint: str) -> str:
    """The run a checkpoint belongs to: <run.dir> of <run.dir>/checkpoints/step_N, else the folder holding it."""
    parent = os.path.dirname(os.path.abspath(checkpoint))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else parent


def _checkpoint_tokenizer(path: str) -> bytes:
    src = os.path.join(path, TOKENIZER_FILE)
    if not os.path.isfile(src):
        # Training writes it into every checkpoint, unless it could not read the data's (a warning then).
        raise CheckpointError(f"checkpoint {path}: no {TOKENIZER_FILE} (training could not read the data's tokenizer)")
    from megagpt.data.tokenizer import eod_id, load_tokenizer

    try:
        eod_id(load_tokenizer(src), src)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {TOKENIZER_FILE}: {e.__cause__ or e}") from None
    with open(src, "rb") as f:
        return f.read()


def write_export(
    model: GPT,
    out: str,
    tokenizer: bytes,
    *,
    source: dict[str, bytes] | None = None,
    dtype: str = "fp32",
    max_shard_bytes: int = 5 * 2**30,
    state: dict | None = None,
    name: str = "megagpt model",
    run_dir: str | None = None,
) -> list[str]:
    """Write a model in memory as a whole Hugging Face folder: the weights in
    `dtype`, config.json, generation_config.json, the tokenizer files
    (`tokenizer`: the data's tokenizer.json; `source`: the files of the folder
    a run started from, hf/tokenizer_files.py) and README.md (`state`: the
    checkpoint's megagpt_state.json).  Returns what the user should know."""
    from megagpt.hf import adapter, hf_config
    from megagpt.hf.model_card import model_card, public_path
    from megagpt.hf.tokenizer_files import own_tokenizer, source_tokenizer

    c = model.cfg
    tok = (
        source_tokenizer(source, tokenizer, c.max_seq_len)
        if source
        else own_tokenizer(tokenizer, c.vocab_size, c.max_seq_len)
    )
    torch_dtype, dtype_name = DTYPES[dtype]
    tensors = _hf_tensors(model, torch_dtype)
    os.makedirs(out, exist_ok=True)
    _write_weights(tensors, out, max_shard_bytes)
    record = dataclasses.replace(c, init_from=public_path(c.init_from)) if c.init_from else c  # a name, not a path
    source_config = json.loads(source["config.json"]) if source and "config.json" in source else None
    config = hf_config(record, tok.ids.get("eos_token_id"), special=tok.ids, dtype=dtype_name, source=source_config)
    _write_json(os.path.join(out, "config.json"), config)
    if source and "generation_config.json" in source:
        _write_bytes(os.path.join(out, "generation_config.json"), source["generation_config.json"])
    else:
        _write_json(
            os.path.join(out, "generation_config.json"),
            {**tok.ids, "do_sample": False, "max_length": c.max_seq_len},
        )
    for file_name, content in tok.files.items():
        _write_bytes(os.path.join(out, file_name), content)
    n_params = sum(t.numel() for t in tensors.values())
    card = model_card(c, adapter(c.family).architecture, n_params, dtype_name, tok.description, name, state, run_dir)
    _write_bytes(os.path.join(out, "README.md"), card.encode())
    return tok.notes


def _write_bytes(path: str, content: bytes) -> None:
    with open(path, "wb") as f:
        f.write(content)


def _hf_tensors(model: GPT, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The model's tensors under the transformers class's names, in `dtype`."""
    from megagpt.hf import to_hf

    tensors = to_hf(model.state_dict(), model.cfg)
    if model.cfg.tie_embeddings:  # transformers re-ties the head; safetensors refuses shared storage anyway
        tensors.pop("lm_head.weight")
    return {k: t.detach().to(dtype).contiguous() for k, t in tensors.items()}


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
    from megagpt.hf import hf_config

    c = model.cfg
    os.makedirs(out, exist_ok=True)
    _write_weights(_hf_tensors(model), out, max_shard_bytes)
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


def _write_weights(tensors: dict, out: str, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

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
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="the exported weights' dtype (default fp32)")
    p.add_argument("--name", help="the model's name in its model card (default: the run's folder name)")
    p.add_argument("--gguf", metavar="FILE", help="also write the export as a GGUF file (llama.cpp, Ollama)")
    p.add_argument("--gguf-type", default="f32", choices=GGUF_TYPES, help="the GGUF file's tensor type (default f32)")
    args = p.parse_args(argv)
    try:
        if args.gguf:
            check_gguf_target(args.gguf)  # before the export's minutes
        check_out(args.out, args.overwrite)  # before verifying, which hashes every file
        path = find_checkpoint(args.checkpoint)
        out = export_checkpoint(path, args.out, args.max_shard_bytes, args.overwrite, args.dtype, args.name)
        if args.gguf:
            write_gguf(out, args.gguf, args.gguf_type)
            out = f"{out} and {args.gguf} ({args.gguf_type})"
    except (CheckpointError, GGUFError) as e:
        print(f"megagpt.export: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # writing: a full disk, no permission
        print(f"megagpt.export: error: cannot write {args.out}: {e}", file=sys.stderr)
        return 2
    print(f"exported {path} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
