"""`python -m megagpt.export --checkpoint DIR --out DIR`: a Hugging Face folder
from a megagpt checkpoint.

DIR may be a checkpoint (`.../checkpoints/step_N`), a checkpoints folder or a
run directory (the newest complete checkpoint is used).  The ZeRO shards are
consolidated offline (DeepSpeed's zero_to_fp32 for stages 1-3, the module
state for stage 0), renamed for the family's transformers class (megagpt/hf), and
written as:

  config.json, generation_config.json, model.safetensors (or
  model-0000i-of-0000n.safetensors + model.safetensors.index.json when larger
  than --max-shard-bytes), tokenizer.json, tokenizer_config.json,
  special_tokens_map.json

Loading DeepSpeed's files unpickles them: export only checkpoints you trust.
"""

from __future__ import annotations

import argparse
import contextlib
from functools import partial
import glob
import io
import os
import sys

import torch

from megagpt.atomic import write_json
from megagpt.checkpoint import STATE_FILE, TOKENIZER_FILE, CheckpointError, complete_checkpoints, load_state
from megagpt.model.config import GPTConfig
from megagpt.model.families import FAMILIES
from megagpt.model.gpt import GPT


_write_json = partial(write_json, indent=2)  # exported JSON as transformers writes it

def find_checkpoint(path: str) -> str:
    """The checkpoint directory DIR names (see the module doc)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path}: no such directory")
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    for root in (path, os.path.join(path, "checkpoints")):
        found = complete_checkpoints(root)
        if found:
            return found[-1][1]
    if os.path.basename(path).startswith("step_"):
        raise CheckpointError(f"checkpoint {path}: incomplete (no {STATE_FILE}; the save did not finish)")
    raise CheckpointError(f"checkpoint {path}: no complete megagpt checkpoint here or under checkpoints/")


def model_config(state: dict, path: str) -> GPTConfig:
    m = state.get("model")
    if not isinstance(m, dict):
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} has no model description "
                              "(written by an older megagpt?)")
    if m.get("family") not in FAMILIES:
        raise CheckpointError(f"checkpoint {path}: unknown model family {m.get('family')!r}; "
                              f"megagpt knows {tuple(FAMILIES)}")
    try:
        return GPTConfig.from_record(m)  # records of older megagpt too
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: bad model description: {e}") from None


def consolidated_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights from the ZeRO shards of checkpoint `path`."""
    stage = _zero_stage(path)
    try:
        # zero_to_fp32 prints its progress and draws progress bars.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            if stage == 0:
                files = glob.glob(os.path.join(path, "mp_rank_*_model_states.pt"))
                if not files:
                    raise FileNotFoundError("no mp_rank_*_model_states.pt")
                # DeepSpeed's own pickle (see the module doc on trust).
                sd = torch.load(sorted(files)[0], map_location="cpu", weights_only=False)["module"]
            else:
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                root, tag = os.path.split(path.rstrip("/"))
                sd = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    except Exception as e:  # noqa: BLE001 - truncated pickles, missing shards, shape mismatches
        msg = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"checkpoint {path}: cannot consolidate the ZeRO-{stage} shards "
                              f"(damaged or incomplete?): {type(e).__name__}: {msg}") from None
    return {k: v.float() for k, v in sd.items()}


def _zero_stage(path: str) -> int:
    state = load_state(path)
    stage = (state.get("config") or {}).get("deepspeed", {}).get("zero_stage")
    if stage is None:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} does not say which ZeRO stage wrote it")
    return int(stage)


def load_model(path: str, attention: str = "sdpa") -> tuple[GPT, dict]:
    """(model in eval mode on CPU, megagpt state) from a checkpoint directory."""
    path = find_checkpoint(path)
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
        raise CheckpointError(f"checkpoint {path}: weights do not match the model description "
                              f"(missing {missing[:3]}, wrong shape {wrong[:3]})")
    model.load_state_dict({k: sd[k] for k in expected})
    return model.eval(), state


def export(checkpoint: str, out: str, max_shard_bytes: int = 5 * 2**30) -> str:
    """Write the Hugging Face folder; returns its path."""
    path = find_checkpoint(checkpoint)
    model, state = load_model(path)
    c = model.cfg
    write_hf_model(model, out, c.eod_id, max_shard_bytes)
    _write_tokenizer(path, out, c.max_seq_len)
    _write_json(os.path.join(out, "megagpt_export.json"),
                {"checkpoint": path, "step": state.get("step"), "tokens_seen": state.get("tokens_seen")})
    return out


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
    _write_json(os.path.join(out, "generation_config.json"),
                {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id, "do_sample": False,
                 "max_length": c.max_seq_len})
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
    _write_json(os.path.join(out, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_tokenizer(path: str, out: str, max_len: int) -> None:
    src = os.path.join(path, TOKENIZER_FILE)
    if not os.path.isfile(src):
        raise CheckpointError(f"checkpoint {path}: no {TOKENIZER_FILE} (written by an older megagpt?)")
    from megagpt.data.tokenizer import eod_id, load_tokenizer

    tok = load_tokenizer(src)
    eos = tok.id_to_token(eod_id(tok, src))
    with open(src, "rb") as f, open(os.path.join(out, TOKENIZER_FILE), "wb") as g:
        g.write(f.read())
    _write_json(os.path.join(out, "tokenizer_config.json"),
                {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
                 "bos_token": eos, "eos_token": eos, "unk_token": eos, "pad_token": eos,
                 "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False})
    _write_json(os.path.join(out, "special_tokens_map.json"),
                {"bos_token": eos, "eos_token": eos, "unk_token": eos, "pad_token": eos})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megagpt.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, checkpoints dir or run dir")
    p.add_argument("--out", required=True, help="folder to write the Hugging Face model into")
    p.add_argument("--max-shard-bytes", type=int, default=5 * 2**30)
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.max_shard_bytes)
    except CheckpointError as e:
        print(f"megagpt.export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {find_checkpoint(args.checkpoint)} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
