"""Starting a run from a Hugging Face model folder: `model.init_from=DIR`.

    torchrun ... -m megagpt.train model.init_from=/models/Llama-3.2-1B data=webdataset data.urls=...

- The model's shape is the folder's `config.json` (hf.read_hf_config: the
  architectures megagpt maps exactly, anything else refused in one line).  A
  shape key the user also chose (a `model=` preset or a `model.<key>=`
  override) that disagrees stops the run, naming the key; the run-time
  settings (attention, dropout, document masking, activation checkpointing,
  compile) are the user's.
- The weights are `model.safetensors`, or the shards that
  `model.safetensors.index.json` names.  Every file, tensor name and shape is
  checked before any heavy work.  They are loaded one module at a time from
  memory-mapped files: under ZeRO-3 rank 0 fills each module's gathered
  parameters and DeepSpeed re-partitions them (engine.init_weights), so no
  rank ever holds more than one module's full weights.
- The data must have been prepared with the model's tokenizer
  (`prepare --tokenizer DIR`): a vocabulary larger than the embedding, or a
  tokenizer.json other than the folder's, stops the run at start.
- Training starts at step 1 with a fresh optimizer; a restart in the same
  run.dir resumes from the run's own checkpoints, never from the folder again.
  Every checkpoint and the W&B config record where the weights came from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megagpt.config import ConfigError
from megagpt.data.tokenizer import TOKENIZER_FILE
from megagpt.hf import read_hf_config, sources
from megagpt.model.config import GPTConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The settings that make the model's shape: they come from config.json.  The
# others (RUN_TIME_KEYS, and attention and the loss chunking) are how this run
# computes, and stay the user's.
RUN_TIME_KEYS = ("dropout", "doc_mask", "activation_checkpointing", "compile", "sdpa_backend", "fp8", "fp8_min_dim")
SHAPE_KEYS = (
    "family",
    "n_layer",
    "n_head",
    "n_kv_head",
    "n_embd",
    "head_dim",
    "vocab_size",
    "max_seq_len",
    "mlp_hidden",
    "bias",
    "norm_eps",
    "rope_theta",
    "tie_embeddings",
)


class InitFromError(ConfigError):
    """A model folder megagpt cannot start from; one line naming the file and the problem."""


@dataclass
class HFModel:
    folder: str
    config: GPTConfig  # as config.json describes it
    tensor_files: dict[str, str]  # Hugging Face tensor name -> the file that holds it
    record: dict  # where the weights came from: written into checkpoints and the W&B config


def open_folder(folder: str) -> HFModel:
    """The model folder, checked through (files, tensor names, shapes) without
    reading any weights.  Cheap: run on every rank before any heavy work."""
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise InitFromError(f"model.init_from: {folder} is not a directory")
    config_path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise InitFromError(f"model.init_from: {folder} has no {CONFIG_FILE}")
    try:
        config = read_hf_config(folder)
    except (ValueError, KeyError, TypeError) as e:
        problem = str(e)  # read_hf_config's messages start with the file already
        where = "" if problem.startswith(config_path) else f"{config_path}: "
        raise InitFromError(f"model.init_from: {where}{problem}") from None
    tensor_files = _tensor_files(folder)
    _check_tensors(config, tensor_files, folder)
    with open(config_path, "rb") as f:
        config_bytes = f.read()
    record = {
        "path": folder,
        "architectures": json.loads(config_bytes).get("architectures"),
        "config_sha256": hashlib.sha256(config_bytes).hexdigest(),
        "weights": {os.path.basename(p): os.path.getsize(p) for p in sorted(set(tensor_files.values()))},
    }
    return HFModel(folder, config, tensor_files, record)


def _tensor_files(folder: str) -> dict[str, str]:
    from safetensors import safe_open

    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise InitFromError(f"model.init_from: {index}: unreadable ({e})") from None
        files = {}
        for name, shard in weight_map.items():
            path = os.path.join(folder, shard)
            if not os.path.isfile(path):
                raise InitFromError(f"model.init_from: {index} names {shard}, which is missing")
            files[name] = path
        return files
    single = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(single):
        raise InitFromError(f"model.init_from: {folder} has neither {WEIGHTS_FILE} nor {INDEX_FILE}")
    try:
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    except Exception as e:  # noqa: BLE001 - a damaged header: any error is the same user error
        raise InitFromError(f"model.init_from: {single}: unreadable ({e})") from None


def _check_tensors(config: GPTConfig, tensor_files: dict[str, str], folder: str) -> None:
    """Every tensor the model needs is there, with a shape that makes the model's:
    checked on shapes alone (meta tensors), before any weight is read."""
    from safetensors import safe_open

    from megagpt.model.gpt import GPT

    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(tensor_files.values())):
        try:
            with safe_open(path, framework="pt") as f:
                shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
        except Exception as e:  # noqa: BLE001 - as above
            raise InitFromError(f"model.init_from: {path}: unreadable ({e})") from None
    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in GPT(config).named_parameters()}
    for name, source in sources(config, tensor_files).items():
        missing = [n for n in source.names if n not in shapes or n not in tensor_files]
        if missing:
            raise InitFromError(f"model.init_from: {folder} has no tensor {missing[0]} (needed for {name})")
        got = tuple(source.combine([torch.empty(shapes[n], device="meta") for n in source.names]).shape)
        if name in expected and got != expected[name]:
            raise InitFromError(
                f"model.init_from: {source.names[0]} in {folder} has shape {shapes[source.names[0]]}, "
                f"which makes {name} {got}; config.json's shape needs {expected[name]}"
            )


def model_config(
    hf: HFModel, settings, chosen: set[str], seq_len: int, attention: str, eod_id: int | None
) -> GPTConfig:
    """The run's model config: the folder's shape, the user's run-time settings.
    `chosen`: the model keys the user set (a preset chooses all of its keys)."""
    for key in SHAPE_KEYS:
        if key in chosen and getattr(settings, key) is not None and getattr(settings, key) != getattr(hf.config, key):
            raise ConfigError(
                f"model.{key}: {getattr(settings, key)} disagrees with {hf.folder}/{CONFIG_FILE} "
                f"({getattr(hf.config, key)}); the shape comes from model.init_from: leave it out"
            )
    window = hf.config.sliding_window
    if window is not None and seq_len > window:
        raise ConfigError(
            f"data.seq_len: {seq_len} is longer than the attention window ({window}) of "
            f"{hf.folder}/{CONFIG_FILE}; megagpt computes full causal attention only"
        )
    if seq_len > hf.config.max_seq_len:
        raise ConfigError(
            f"data.seq_len: {seq_len} is longer than the {hf.config.max_seq_len} positions of {hf.folder}/{CONFIG_FILE}"
        )
    run_time = {key: getattr(settings, key) for key in RUN_TIME_KEYS}
    return dataclasses.replace(hf.config, attention=attention, eod_id=eod_id, init_from=hf.folder, **run_time)


def check_tokenizer(hf: HFModel, data_vocab_size: int, data_tokenizer: bytes | None) -> None:
    """The data was tokenized with the model's tokenizer: its ids fit the
    embedding, and its tokenizer.json is the folder's (as JSON: formatting
    aside).  Without a tokenizer.json in the folder only the first holds."""
    if data_vocab_size > hf.config.vocab_size:
        raise ConfigError(
            f"data: its tokenizer has {data_vocab_size} tokens, more than the {hf.config.vocab_size} "
            f"rows of {hf.folder}'s embedding; prepare the data with --tokenizer {hf.folder}"
        )
    theirs = os.path.join(hf.folder, TOKENIZER_FILE)
    if data_tokenizer is None or not os.path.isfile(theirs):
        return
    with open(theirs, "rb") as f:
        if _canonical(f.read()) != _canonical(data_tokenizer):
            raise ConfigError(
                f"data: prepared with another tokenizer than {theirs}; prepare it with --tokenizer {hf.folder}"
            )


def _canonical(tokenizer_json: bytes) -> bytes:
    try:
        return json.dumps(json.loads(tokenizer_json), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:
        return tokenizer_json


def module_loader(hf: HFModel, config: GPTConfig) -> Callable[[str, torch.nn.Module], None]:
    """`load(name, module)`: fills the parameters `module` owns directly (not
    its children) from the folder, reading only the tensors they are made
    of, from memory-mapped files that are closed again before it returns (a
    mapping kept open would keep every page read so far resident: the whole
    model by the end).  For engine.init_weights."""
    from safetensors import safe_open

    table = sources(config, hf.tensor_files)

    def load(module_name: str, module: torch.nn.Module) -> None:
        wanted = {}
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if full in table:  # absent: the output head tied to the embeddings, filled with them
                wanted[full] = param
        needed = {n for full in wanted for n in table[full].names}
        tensors: dict[str, torch.Tensor] = {}
        for path in sorted({hf.tensor_files[n] for n in needed}):
            with safe_open(path, framework="pt") as f:
                tensors.update({n: f.get_tensor(n) for n in needed if hf.tensor_files[n] == path})
        with torch.no_grad():
            for full, param in wanted.items():
                source = table[full]
                param.copy_(source.combine([tensors[n] for n in source.names]).to(param.dtype))

    return load
