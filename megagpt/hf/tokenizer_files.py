"""An export's tokenizer files and the special-token ids its config.json and
generation_config.json give, for every transformers version megagpt allows
(pyproject.toml: 4.45 to 5.x).

A model trained on megagpt's own tokenizer (`own_tokenizer`): a byte-level
BPE whose one special token, <|endoftext|>, ends every document.  It is eos,
and bos as in GPT-2 (megagpt adds no bos).  The pad token is a token of its
own, <|pad|>: DataCollatorForLanguageModeling masks every label equal to the
pad id, so a pad equal to eos would hide every EOS from a fine-tune, which
then never learns to stop.  Its id is one no training step ever fed to the
model, so no weight changes:
  - the first row of the embedding past the tokenizer's ids, where the
    vocabulary was padded up to model.vocab_multiple (rows no token uses);
  - else the id of a byte UTF-8 text never holds (0xC0, 0xC1, 0xF5..0xFF;
    megagpt's tokenizer has all 256 bytes, and no merge of these), renamed
    <|pad|> in tokenizer.json: encoding any text gives the same ids as before;
  - else (a tokenizer from elsewhere without either) pad stays eos, and
    `note` says so.
tokenizer_config.json names model_input_names: without it transformers 4.x's
PreTrainedTokenizerFast also returns token_type_ids, which GPT-2 adds to its
embeddings (other logits) and Llama's generate() refuses.

A run started from a Hugging Face folder (model.init_from) carries the
folder's tokenizer and config files in every checkpoint (SOURCE_DIR,
read_source_files): the folder may be gone by export time.  `source_tokenizer`
writes them unchanged, with the folder's bos/eos/pad ids; training changes
none of them (the data was tokenized with the folder's tokenizer, the
vocabulary is the folder's exactly).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from megagpt.data.tokenizer import TOKENIZER_FILE

# In a checkpoint of a run started from a folder: the folder's files below, as they were.
SOURCE_DIR = "init_from"
SOURCE_FILES = (
    "config.json",
    "generation_config.json",
    TOKENIZER_FILE,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",  # sentencepiece, for the slow tokenizer classes
    "added_tokens.json",
)
# The source's tokenizer files an export writes unchanged (config.json and generation_config.json are merged).
_SOURCE_TOKENIZER_FILES = SOURCE_FILES[2:]
PAD_TOKEN = "<|pad|>"
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]
ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Bytes that never occur in UTF-8: a byte-level BPE's tokens for them are never produced from text.
_NEVER_IN_UTF8 = (*range(0xFF, 0xF4, -1), 0xC1, 0xC0)


@dataclass
class TokenizerExport:
    files: dict[str, bytes]  # file name in the export -> its bytes
    ids: dict[str, int | None]  # bos_token_id, eos_token_id, pad_token_id for config.json
    generation_config: dict | None = None  # the source's generation_config.json, written unchanged
    description: str = ""  # for the model card
    notes: list[str] = field(default_factory=list)  # what the user should know (printed on stderr)


def read_source_files(folder: str) -> dict[str, bytes]:
    """The files of SOURCE_FILES that `folder` has, name -> bytes (a run carries them in each checkpoint)."""
    out = {}
    for name in SOURCE_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = f.read()
    return out


def carried_source_files(checkpoint: str) -> dict[str, bytes] | None:
    """The source folder's files a checkpoint carries, or None (a run not started from a folder)."""
    folder = os.path.join(checkpoint, SOURCE_DIR)
    return read_source_files(folder) if os.path.isdir(folder) else None


def _json(value: dict) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode()


def own_tokenizer(tokenizer_json: bytes, vocab_rows: int, max_len: int) -> TokenizerExport:
    """The files for megagpt's own tokenizer (see the module doc) and a model
    of `vocab_rows` embedding rows and `max_len` positions."""
    from tokenizers import Tokenizer

    from megagpt.data.tokenizer import eod_id

    spec = json.loads(tokenizer_json)
    tok = Tokenizer.from_str(tokenizer_json.decode())
    eos_id = eod_id(tok)
    eos = tok.id_to_token(eos_id)
    notes = []
    pad_id, how = _reserve_pad(spec, tok, vocab_rows)
    if pad_id is None:
        pad_id, pad = eos_id, eos
        notes.append(
            f"pad token: eos ({eos!r}); the tokenizer has no id to spare for a pad token, so "
            "DataCollatorForLanguageModeling masks EOS labels too"
        )
        files = {TOKENIZER_FILE: tokenizer_json}
    else:
        pad = PAD_TOKEN
        files = {TOKENIZER_FILE: json.dumps(spec, ensure_ascii=False).encode()}
    files["tokenizer_config.json"] = _json(
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_input_names": MODEL_INPUT_NAMES,
            "model_max_length": max_len,
            "bos_token": eos,
            "eos_token": eos,
            "pad_token": pad,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
    )
    files["special_tokens_map.json"] = _json({"bos_token": eos, "eos_token": eos, "pad_token": pad})
    vocab = tok.get_vocab_size()
    description = (
        f"megagpt's byte-level BPE, {vocab} tokens; {eos} (id {eos_id}) ends every document and is "
        f"eos (and bos: megagpt adds none); pad: {pad} (id {pad_id}{how})"
    )
    ids = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    return TokenizerExport(files, ids, description=description, notes=notes)


def _reserve_pad(spec: dict, tok, vocab_rows: int) -> tuple[int | None, str]:
    """Give <|pad|> an id no training step fed the model, in `spec` (tokenizer.json as a dict):
    (its id, how it was found), or (None, "")."""
    existing = tok.token_to_id(PAD_TOKEN)
    if existing is not None:
        return existing, ""
    used = tok.get_vocab_size()  # ids 0 .. used-1 (added tokens included)
    if used < vocab_rows:  # a padded row: tokenizers gives a new added token the next id
        spec.setdefault("added_tokens", []).append(_added(PAD_TOKEN, used))
        return used, ", a row of the padded embedding no token used"
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        return None, ""
    alphabet = _byte_alphabet()
    merged = {part for m in model.get("merges", []) for part in (m.split(" ") if isinstance(m, str) else m)}
    for byte in _NEVER_IN_UTF8:
        symbol = alphabet[byte]
        if symbol in model["vocab"] and symbol not in merged:
            # The content must be in the model's vocabulary: tokenizers gives an added token
            # the vocabulary's id for its content, not the id tokenizer.json states.
            model["vocab"][PAD_TOKEN] = pad_id = model["vocab"].pop(symbol)
            spec.setdefault("added_tokens", []).append(_added(PAD_TOKEN, pad_id))
            return pad_id, f", the id of byte 0x{byte:X}, which UTF-8 text never holds"
    return None, ""


def _added(content: str, token_id: int) -> dict:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def _byte_alphabet() -> dict[int, str]:
    """byte -> the character a byte-level BPE (GPT-2's mapping) writes it as."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def source_tokenizer(source: dict[str, bytes], data_tokenizer: bytes | None, max_len: int) -> TokenizerExport:
    """The files of the folder a run started from (`source`: read_source_files),
    unchanged; its tokenizer.json where it has one, else the data's
    (hf_import.check_tokenizer: the same tokenizer).  The ids: config.json's.
    A folder with a tokenizer.json alone gets a tokenizer_config.json and
    special_tokens_map.json naming config.json's special tokens (eos: the
    end-of-document token where config.json names none)."""
    from tokenizers import Tokenizer

    from megagpt.data.tokenizer import eod_id

    files = {name: source[name] for name in _SOURCE_TOKENIZER_FILES if name in source}
    if TOKENIZER_FILE not in files and data_tokenizer is not None:
        files[TOKENIZER_FILE] = data_tokenizer
    config = json.loads(source["config.json"]) if "config.json" in source else {}
    generation = json.loads(source["generation_config.json"]) if "generation_config.json" in source else None
    ids = {key: config[key] for key in ID_KEYS if key in config}
    if "tokenizer_config.json" not in files and TOKENIZER_FILE in files:
        tok = Tokenizer.from_str(files[TOKENIZER_FILE].decode())
        if ids.get("eos_token_id") is None:
            ids["eos_token_id"] = eod_id(tok)
        tokens = {
            key.removesuffix("_id"): tok.id_to_token(ids[key])
            for key in ID_KEYS
            if isinstance(ids.get(key), int) and tok.id_to_token(ids[key]) is not None
        }
        files["tokenizer_config.json"] = _json(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_input_names": MODEL_INPUT_NAMES,
                "model_max_length": max_len,
                **tokens,
                "clean_up_tokenization_spaces": False,
            }
        )
        files.setdefault("special_tokens_map.json", _json(tokens))
    tok_config = json.loads(files["tokenizer_config.json"]) if "tokenizer_config.json" in files else {}
    kind = tok_config.get("tokenizer_class", "tokenizer.json")
    specials = ", ".join(f"{key.removesuffix('_token_id')} {ids[key]}" for key in ID_KEYS if ids.get(key) is not None)
    description = f"the source model's ({kind}; {specials or 'no special ids in config.json'})"
    if "chat_template" in tok_config or "chat_template.jinja" in files:
        description += ", with its chat template"
    return TokenizerExport(files, ids, generation, description=description)
