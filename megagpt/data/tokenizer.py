"""Tokenizer helpers: train a byte-level BPE, load a Hugging Face tokenizer, find the EOD id."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# A Hugging Face tokenizers file: in a prepared dataset, a checkpoint, an export and a model folder.
TOKENIZER_FILE = "tokenizer.json"
EOD_TOKEN = "<|endoftext|>"
# End-of-document tokens of common pretrained tokenizers, tried when EOD_TOKEN is absent.
_FALLBACK_EOD_TOKENS = ("</s>", "<|end_of_text|>", "<eos>")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE tokenizer on ``texts``.

    Seeding the trainer with the full 256-symbol byte alphabet guarantees that any
    input, including bytes never seen in training, can be encoded.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str) -> Tokenizer:
    """Load ``path`` (a ``tokenizer.json`` file or a folder that contains one)."""
    p = Path(path)
    file = p / TOKENIZER_FILE if p.is_dir() else p
    if not file.is_file():
        raise ValueError(f"tokenizer not found: {file} (expected a tokenizer.json file or a folder containing one)")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a bare Exception for parse errors
        raise ValueError(f"cannot read tokenizer {file}: {e}") from e


def eod_id(tok: Tokenizer, name: str | None = None) -> int:
    """Id of the token that separates documents; ``name`` (e.g. its path) is used in errors."""
    for token in (EOD_TOKEN, *_FALLBACK_EOD_TOKENS):
        tid = tok.token_to_id(token)
        if tid is not None:
            return tid
    # A Tokenizer object has no name of its own; its model type and size identify it otherwise.
    desc = name or f"{type(tok.model).__name__} tokenizer with {tok.get_vocab_size()} tokens"
    tried = ", ".join(repr(t) for t in (EOD_TOKEN, *_FALLBACK_EOD_TOKENS))
    raise ValueError(f"tokenizer {desc} has no end-of-document token (tried {tried})")


def token_dtype(vocab_size: int) -> str:
    """Smallest unsigned numpy dtype name that holds every token id."""
    return "uint16" if vocab_size <= 65536 else "uint32"
