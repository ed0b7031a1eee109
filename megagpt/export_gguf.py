"""A GGUF file (llama.cpp, Ollama) from an export's folder, written with
llama.cpp's own `gguf` package (`pip install gguf`).

  python -m megagpt.export --checkpoint RUN --out RUN/hf --gguf RUN/model.gguf [--gguf-type q8_0]
  python -m megagpt.export_gguf --model RUN/hf --out RUN/model.gguf [--type q8_0]

The folder is one `megagpt.export` writes (or any Hugging Face folder of a
family below): config.json, model.safetensors (or shards with an index),
tokenizer.json, and tokenizer_config.json for the special tokens.

Why not llama.cpp's convert_hf_to_gguf.py: it recognises a BPE tokenizer
by the hash of its output on a fixed text, so every tokenizer megagpt
trains is unknown to it.  Here the tokenizer's pre-tokenization is read
from tokenizer.json and declared by name (`tokenizer.ggml.pre`) only
where llama.cpp splits text with exactly the same regex (PRE_TOKENIZERS);
any other tokenizer is refused, never guessed.

The families (FAMILIES, one row each; a family is added as a row):

  gpt2             -> GGUF arch gpt2   GPT-2's Conv1D weights are stored (in, out):
                                       transposed to llama.cpp's (out, in)
  llama, mistral   -> GGUF arch llama  llama.cpp's `llama` rotates adjacent pairs
                                       (2i, 2i+1); Hugging Face rotates (i, i + d/2):
                                       the rows of q and k (weights and biases) are
                                       reordered within each head (`interleave_rope_rows`)
  qwen2, qwen3     -> GGUF arch qwen2, qwen3  as stored (llama.cpp rotates their halves as
                                       Hugging Face does); Qwen3's q_norm / k_norm kept

The tokenizer: every token by id (the embedding's padding rows as unused
`[PAD<id>]`), its type, the merges, bos/eos/pad/unk, whether bos/eos are
added (what tokenizer.json's post-processor does), the chat template.

Types (`--gguf-type`): f32 (the default, exact), f16, bf16 and q8_0 (gguf's
own quantizer, llama.cpp's Q8_0 blocks of 32).  1-D tensors (norms, biases)
and GPT-2's position table stay f32, as llama.cpp's converter keeps them; a
q8_0 matrix whose rows are not a multiple of 32 is written f16.

The file is written tensor by tensor (one tensor in memory at a time) to
`<file>.partial-<pid>` and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from dataclasses import dataclass

import numpy as np
import torch

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


class GGUFError(ValueError):
    """One line saying what is wrong (the folder, the key, the tokenizer)."""


# -- the families ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFFamily:
    """How one megagpt family is written as GGUF."""

    arch: str  # the GGUF architecture: a name in gguf.MODEL_ARCH_NAMES
    rms_norm: bool  # RMSNorm (`layer_norm_rms_epsilon`) or LayerNorm (`layer_norm_epsilon`)
    rotary: bool  # RoPE: rope_freq_base, rope_dimension_count (and rope_freqs for llama3 scaling)
    interleave_rope: bool  # llama.cpp rotates adjacent pairs here: q/k rows reordered (see the module doc)
    transposed: tuple[str, ...] = ()  # tensor name endings stored (in, out): GPT-2's Conv1D


FAMILIES: dict[str, GGUFFamily] = {
    "gpt2": GGUFFamily(
        "gpt2",
        rms_norm=False,
        rotary=False,
        interleave_rope=False,
        transposed=(".c_attn.weight", ".c_proj.weight", ".c_fc.weight"),
    ),
    "llama": GGUFFamily("llama", rms_norm=True, rotary=True, interleave_rope=True),
    # llama.cpp computes Mistral as llama (its converter maps MistralForCausalLM there); megagpt
    # computes full causal attention too (the sliding window is not applied: docs/models.md).
    "mistral": GGUFFamily("llama", rms_norm=True, rotary=True, interleave_rope=True),
    # llama.cpp rotates Qwen's halves as Hugging Face does (its NEOX rope): no reordering.
    "qwen2": GGUFFamily("qwen2", rms_norm=True, rotary=True, interleave_rope=False),
    "qwen3": GGUFFamily("qwen3", rms_norm=True, rotary=True, interleave_rope=False),  # + attn_q_norm, attn_k_norm
}


def interleave_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q or k rows (heads * head_dim, ...) from Hugging Face's rotate-half order
    (row i pairs with i + head_dim / 2) to llama.cpp's adjacent pairs (2i, 2i + 1):
    within each head, row order 0, d/2, 1, d/2 + 1, ..."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# -- the tokenizer -----------------------------------------------------------------------------

# GPT-2's split (Hugging Face's ByteLevel pre-tokenizer with use_regex), spelled as in tokenizers.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3's and Qwen's splits (their tokenizer.json's Split regex): they differ in \p{N}{1,3} / \p{N}.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# llama.cpp pre-tokenizer name (src/llama-vocab.cpp) -> (the regex its BPE splits text with, read as
# tokenizers writes it, whether llama.cpp then takes a piece that is a whole token as it is:
# `ignore_merges`, which it sets for these names by itself).  gpt-2: llama.cpp's GPT-2 regex without
# the final `|\s+`, which only matches whitespace its other alternatives leave, and llama.cpp keeps
# every unmatched stretch as a piece of its own, so both split the same.
PRE_TOKENIZERS: dict[str, tuple[str, bool]] = {
    "gpt-2": (GPT2_SPLIT, False),
    "llama-bpe": (LLAMA3_SPLIT, True),
    "qwen2": (QWEN2_SPLIT, False),  # Qwen2, Qwen2.5 and Qwen3
}
# Normalizers llama.cpp does not apply, accepted for one pre-tokenizer with a note: Qwen's NFC
# (llama.cpp's converter writes Qwen's tokenizer so too).  Text already in NFC, as nearly all
# text is, tokenizes the same; other text (decomposed accents) may not.
NORMALIZERS: dict[str, str] = {"qwen2": "NFC"}


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]  # gguf.TokenType
    merges: list[str]
    pre: str
    special: dict[str, int]  # bos, eos, pad, unk -> id (those the folder names)
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    notes: list[str]  # what the user should know


def _split_regex(pre: dict | None) -> tuple[str | None, str]:
    """The regex tokenizer.json's pre-tokenizer splits text with, when it is a
    byte-level BPE's (ByteLevel with its own GPT-2 regex, or a Split by a regex
    followed by ByteLevel without one); None and a description otherwise."""
    if not isinstance(pre, dict):
        return None, f"pre_tokenizer {pre!r}"
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space") or not pre.get("use_regex", True):
            return None, f"ByteLevel pre-tokenizer {json.dumps(pre, sort_keys=True)}"
        return GPT2_SPLIT, "ByteLevel"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if (
        isinstance(steps, list)
        and len(steps) == 2
        and steps[0].get("type") == "Split"
        and steps[0].get("behavior") == "Isolated"
        and not steps[0].get("invert")
        and isinstance(steps[0].get("pattern"), dict)
        and "Regex" in steps[0]["pattern"]
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("add_prefix_space")
        and steps[1].get("use_regex") is False
    ):
        return steps[0]["pattern"]["Regex"], f"Split by {steps[0]['pattern']['Regex']!r}"
    return None, f"pre_tokenizer {json.dumps(pre, sort_keys=True)[:200]}"


def _token_name(value) -> str | None:
    """A special token as tokenizer_config.json names it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_vocab(folder: str, n_vocab: int) -> Vocab:
    """The tokenizer of `folder` as GGUF holds it, for an embedding of `n_vocab`
    rows (ids past the tokenizer's are written as unused `[PAD<id>]` tokens)."""
    from tokenizers import Tokenizer

    path = os.path.join(folder, "tokenizer.json")
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        tok = Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 (a missing file, bad JSON; the Rust side raises a bare Exception)
        raise GGUFError(f"{path}: cannot read it: {' '.join(str(e).splitlines())}") from None

    def refuse(problem: str) -> GGUFError:
        return GGUFError(f"{path}: {problem}; llama.cpp would tokenize differently, so no GGUF is written")

    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("dropout"):
        kind = f"{model.get('type')}" + (
            " with byte_fallback (SentencePiece style)" if model.get("byte_fallback") else ""
        )
        raise refuse(f"the model is {kind}, not a byte-level BPE")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise refuse("the BPE has a subword prefix or suffix")
    decoder = spec.get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        raise refuse(f"the decoder is {decoder.get('type')}, not ByteLevel")
    regex, described = _split_regex(spec.get("pre_tokenizer"))
    names = [name for name, (known, _) in PRE_TOKENIZERS.items() if known == regex]
    if not names:
        raise refuse(f"its {described} matches no llama.cpp pre-tokenizer megagpt maps ({', '.join(PRE_TOKENIZERS)})")
    pre = names[0]
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer is not None and NORMALIZERS.get(pre) != normalizer:
        raise refuse(f"the normalizer {normalizer} has no llama.cpp equivalent")
    if bool(model.get("ignore_merges")) != PRE_TOKENIZERS[pre][1]:
        raise refuse(f"ignore_merges {bool(model.get('ignore_merges'))} differs from llama.cpp's {pre!r}")

    # ids: the model's vocabulary and the added tokens, each id once
    by_id: dict[int, str] = {i: t for t, i in model.get("vocab", {}).items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    size = max(by_id) + 1 if by_id else 0
    if size > n_vocab:
        raise GGUFError(f"{path}: it has {size} token ids, the model's embedding only {n_vocab} rows")
    import gguf

    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:  # padding rows of the embedding (model.vocab_multiple), or a hole in the ids
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    special = _special_ids(folder, tok)
    add_bos, add_eos = _added_specials(tok, special, refuse)
    config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    template = config.get("chat_template")
    jinja = os.path.join(folder, "chat_template.jinja")  # where transformers >= 4.43 saves it
    if template is None and os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    notes = []
    if normalizer is not None:
        notes.append(
            f"{path}: llama.cpp does not apply the tokenizer's {normalizer} normalizer: text in {normalizer} "
            "(nearly all text) tokenizes the same, other text may not"
        )
    template = template if isinstance(template, str) else None
    return Vocab(tokens, [int(t) for t in types], merges, pre, special, add_bos, add_eos, template, notes)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise GGUFError(f"{path}: cannot read it: {' '.join(str(e).splitlines())}") from None
    return obj if isinstance(obj, dict) else {}


def _special_ids(folder: str, tok) -> dict[str, int]:
    """bos/eos/pad/unk ids: tokenizer_config.json's tokens, else config.json's
    `<name>_token_id` (as transformers reads them)."""
    named = _read_json(os.path.join(folder, "tokenizer_config.json"))
    config = _read_json(os.path.join(folder, "config.json"))
    out = {}
    for kind in ("bos", "eos", "pad", "unk"):
        name = _token_name(named.get(f"{kind}_token"))
        if name is not None:
            tid = tok.token_to_id(name)
            if tid is None:
                raise GGUFError(
                    f"{os.path.join(folder, 'tokenizer_config.json')}: {kind}_token {name!r} is not in tokenizer.json"
                )
            out[kind] = tid
            continue
        tid = config.get(f"{kind}_token_id")
        if isinstance(tid, list):  # several end-of-generation ids: GGUF holds one
            tid = tid[0] if tid else None
        if isinstance(tid, int):
            out[kind] = tid
    return out


def _added_specials(tok, special: dict[str, int], refuse) -> tuple[bool, bool]:
    """Whether encoding adds bos before / eos after the text, as tokenizer.json's
    post-processor does (what transformers and megagpt's tokenizer do)."""
    text = "megagpt"
    plain = tok.encode(text, add_special_tokens=False).ids
    full = tok.encode(text).ids
    starts = [i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain]
    if not starts:
        raise refuse("its post-processor changes the text's tokens")
    before, after = full[: starts[0]], full[starts[0] + len(plain) :]
    if before not in ([], [special.get("bos")]) or after not in ([], [special.get("eos")]):
        raise refuse(f"its post-processor adds {before} before and {after} after the text, not just bos/eos")
    return bool(before), bool(after)


# -- the weights -------------------------------------------------------------------------------


def _block_order(name: str) -> tuple:
    """Sort key: the embeddings, then block by block, then the final norm and head."""
    m = re.search(r"\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)), name)
    return (0 if "embed" in name or name.split(".")[-2] in ("wte", "wpe") else 2, 0, name)


def _out_type(name: str, shape: tuple[int, ...], kind: str, qtypes) -> "object":
    """The GGML type a tensor is written in (see the module doc)."""
    if len(shape) < 2 or name.startswith("position_embd") or kind == "f32":
        return qtypes.F32
    if kind == "q8_0" and shape[-1] % 32 != 0:
        return qtypes.F16
    return {"f16": qtypes.F16, "bf16": qtypes.BF16, "q8_0": qtypes.Q8_0}[kind]


def _encode(data: np.ndarray, qtype, qtypes) -> np.ndarray:
    """fp32 `data` in GGML type `qtype` (F16 as float16, others as gguf's byte arrays)."""
    import gguf

    if qtype == qtypes.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == qtypes.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def write_gguf(folder: str, path: str, kind: str = "f32", overwrite: bool = False) -> str:
    """Write `folder` (an export) as the GGUF file `path`; returns `path`.
    Raises GGUFError (one line) for what cannot be written exactly."""
    check_target(path, overwrite)
    import gguf
    from safetensors import safe_open

    from megagpt.hf import HFConfigError, config_from_hf, sources, stored_tensors

    if kind not in GGUF_TYPES:
        raise GGUFError(f"GGUF type {kind!r} is not supported (supported: {', '.join(GGUF_TYPES)})")
    folder = os.path.abspath(folder)
    config_path = os.path.join(folder, "config.json")
    config = _read_json(config_path)
    if not config:
        raise GGUFError(f"{config_path}: no such file (give an export's folder)")
    try:
        c = config_from_hf(config, config_path)
    except (HFConfigError, TypeError, ValueError) as e:
        raise GGUFError(f"{config_path}: {' '.join(str(e).splitlines())}") from None
    row = FAMILIES.get(c.family)
    if row is None:
        raise GGUFError(f"{config_path}: family {c.family!r} has no GGUF writer (supported: {', '.join(FAMILIES)})")
    try:
        where = stored_tensors(folder)
    except (OSError, ValueError, KeyError) as e:
        raise GGUFError(f"{folder}: cannot read the safetensors files: {' '.join(str(e).splitlines())}") from None
    needed = {n for s in sources(c, where.keys()).values() for n in s.names}
    missing = sorted(needed - where.keys())
    if missing:
        raise GGUFError(
            f"{folder}: the safetensors files lack {len(missing)} tensors the model needs, e.g. {missing[:3]}"
        )
    vocab = read_vocab(folder, c.vocab_size)
    for note in vocab.notes:
        print(f"megagpt: note: {note}", file=sys.stderr, flush=True)

    arch = gguf.MODEL_ARCH[row.arch.upper()]
    names = gguf.get_tensor_name_map(arch, c.n_layer)
    plan = []  # (GGUF name, stored name, shape, GGML type)
    with contextlib.ExitStack() as stack:
        files = {
            fname: stack.enter_context(safe_open(os.path.join(folder, fname), framework="pt"))
            for fname in sorted(set(where.values()))
        }
        for stored in sorted(where, key=_block_order):
            new = names.get_name(stored, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise GGUFError(f"{folder}: tensor {stored!r} has no GGUF name for arch {row.arch}")
            shape = tuple(files[where[stored]].get_slice(stored).get_shape())
            if stored.endswith(row.transposed):
                shape = shape[::-1]
            plan.append((new, stored, shape, _out_type(new, shape, kind, gguf.GGMLQuantizationType)))
        if row.rotary and c.llama3_scaling is not None:
            plan.append(("rope_freqs.weight", None, (c.head_dim // 2,), gguf.GGMLQuantizationType.F32))
        # general.name: the export's (megagpt_export.json), else the folder's
        name = _read_json(os.path.join(folder, "megagpt_export.json")).get("name") or os.path.basename(folder)
        return _write(path, gguf, arch, c, row, vocab, kind, plan, files, where, str(name))


def _tensor(stored: str | None, files, where, c, row) -> torch.Tensor:
    """The fp32 tensor written for `stored` (None: llama3's rope_freqs), transformed for llama.cpp."""
    if stored is None:
        from megagpt.model.layers import rope_inv_freq

        # llama.cpp divides its base frequencies by these factors: unscaled / scaled (megagpt's formula).
        plain = rope_inv_freq(c.head_dim, c.rope_theta)
        return plain / rope_inv_freq(c.head_dim, c.rope_theta, c.llama3_scaling)
    t = files[where[stored]].get_tensor(stored).float()
    if stored.endswith(row.transposed):
        t = t.t()
    if row.interleave_rope and re.search(r"\.(q|k)_proj\.(weight|bias)$", stored):
        t = interleave_rope_rows(t, c.n_head if ".q_proj." in stored else c.n_kv_head)
    return t.contiguous()


def _write(path, gguf, arch, c, row, vocab: Vocab, kind, plan, files, where, name: str) -> str:
    qtypes = gguf.GGMLQuantizationType
    tmp = f"{path}.partial-{os.getpid()}"
    w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
    try:
        w.add_name(name)
        _metadata(w, gguf, c, row, vocab, kind)
        for name, _, shape, qtype in plan:
            if qtype in (qtypes.F32, qtypes.F16):
                dtype = np.float32 if qtype == qtypes.F32 else np.float16
                w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
            else:
                byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
                w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, stored, _, qtype in plan:  # one tensor in memory at a time
            data = _tensor(stored, files, where, c, row).numpy()
            w.write_tensor_data(_encode(data, qtype, qtypes))
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _metadata(w, gguf, c, row: GGUFFamily, vocab: Vocab, kind: str) -> None:
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[kind]
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.mlp_hidden)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_kv_head)
    w.add_vocab_size(c.vocab_size)
    if row.rms_norm:
        w.add_layer_norm_rms_eps(c.norm_eps)
    else:
        w.add_layer_norm_eps(c.norm_eps)
    if row.rotary:
        w.add_rope_freq_base(c.rope_theta)
        w.add_rope_dimension_count(c.head_dim)
        w.add_key_length(c.head_dim)  # llama.cpp's default, n_embd / n_head, is not every family's
        w.add_value_length(c.head_dim)
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tokenizer_model("gpt2")  # llama.cpp's byte-level BPE
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    for kind_, add in (
        ("bos", w.add_bos_token_id),
        ("eos", w.add_eos_token_id),
        ("pad", w.add_pad_token_id),
        ("unk", w.add_unk_token_id),
    ):
        if kind_ in vocab.special:
            add(vocab.special[kind_])
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)


def check_target(path: str, overwrite: bool = False) -> None:
    """Raise GGUFError unless a GGUF file can be written to `path`: the gguf
    package is there, and `path` is new or an earlier GGUF file (anything
    else only with `overwrite`)."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GGUFError("writing GGUF needs the gguf package (llama.cpp's gguf-py): pip install gguf") from None
    if os.path.isdir(path):
        raise GGUFError(f"cannot write {path}: it is a folder (give a file name, e.g. model.gguf)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise GGUFError(f"cannot write {path}: its folder does not exist")
    if os.path.exists(path) and not overwrite:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise GGUFError(
                    f"cannot write {path}: it exists and is not a GGUF file; give --overwrite to replace it"
                )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m megagpt.export_gguf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="an export's folder (python -m megagpt.export --out)")
    p.add_argument("--out", required=True, help="the GGUF file to write")
    p.add_argument("--type", default="f32", choices=GGUF_TYPES, help="tensor type (default f32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out that is not a GGUF file")
    args = p.parse_args(argv)
    try:
        write_gguf(args.model, args.out, args.type, args.overwrite)
    except GGUFError as e:
        print(f"megagpt.export_gguf: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"megagpt.export_gguf: error: cannot write {args.out}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.type}) from {args.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
