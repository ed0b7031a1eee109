"""The model's config: the `model.*` settings, resolved.

`ModelConfig` (megagpt/config.py) is the Hydra schema users set
(`model.n_layer=...`).  `GPTConfig` extends it: every field, name and default
inherited, plus what only a model being built knows:

  vocab_size   required, final (the tokenizer's or model.vocab_size, padded)
  max_seq_len  required, final (model.max_seq_len or data.seq_len)
  attention    a concrete backend (flash_attn | sdpa | eager), not auto
  sdpa_backend on an SDPA run on CUDA, the kernel its SDPA calls use (cudnn | flash |
               efficient | math: run.py sets the one auto measured); auto: torch's choice
  compile      true or false for the device the model runs on, not None (auto)
  loss_chunk_tokens  a number of tokens (0: the plain loss) for that device, not None
  eod_id       the end-of-document token id (document masking)

`GPTConfig.from_settings` builds one from the settings by copying every field
by name; the defaults left open (None) are resolved there (the ones that need
the data and the device) and in `__post_init__` (n_kv_head, head_dim, mlp_hidden: the family's rule,
families.py), and nowhere else.  `check` holds the model's checks; both
`config_checks.validate()` (on the settings) and every GPTConfig run it, and it
raises ConfigError with one line naming the key.

A GPTConfig's dict (`dataclasses.asdict`) is the model record in a
checkpoint's megagpt_state.json ("model") and in an exported config.json
("megagpt"); `from_record` reads it back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from megagpt.config import ConfigError, ModelConfig
from megagpt.model.attention import BACKENDS
from megagpt.model.families import Family, family
from megagpt.model.layers import Llama3Scaling

# model.rope_scaling's types, and the settings each needs (layers.py: Llama3Scaling).
ROPE_SCALINGS = ("llama3",)
LLAMA3_KEYS = (
    "rope_scaling_factor",
    "rope_scaling_low_freq_factor",
    "rope_scaling_high_freq_factor",
    "rope_scaling_original_max_seq_len",
)


# model.loss_chunk_tokens=null (auto) on CUDA: chunks of about this many logits, 1 GiB in fp32.  A
# chunk's transient memory is about 8 bytes per logit (its fp32 logits and log-probabilities, loss.py),
# 2 GiB: small beside llama-1b's 8 x 2048-token micro-batch (its plain loss needs about 20 GB), while
# each chunk's matmuls stay large (2048 x 2048 x 128256 for llama 3's vocabulary: about a TFLOP), so
# the number of chunks costs nothing measurable; the elementwise work is the same for any chunk size.
LOSS_CHUNK_LOGITS = 1 << 28
LOSS_CHUNK_MULTIPLE = 1024


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"model.{key}: {msg}")


def auto_loss_chunk_tokens(vocab_size: int) -> int:
    """The chunk model.loss_chunk_tokens=null gives on CUDA: LOSS_CHUNK_LOGITS logits or fewer, in
    whole multiples of LOSS_CHUNK_MULTIPLE tokens (at least one): 2048 tokens for a 128256-token
    vocabulary (llama 3), 5120 for 50304 (gpt2), 8192 for 32000."""
    return max(LOSS_CHUNK_MULTIPLE, LOSS_CHUNK_LOGITS // vocab_size // LOSS_CHUNK_MULTIPLE * LOSS_CHUNK_MULTIPLE)


def for_device(m: Any, device_type: str, vocab_size: int) -> dict:
    """The settings whose None means "auto", for a model of `vocab_size` tokens on `device_type`:
    the one place they are resolved.  On CUDA: compiled, and the loss in chunks
    (auto_loss_chunk_tokens).  Elsewhere: eager and the plain loss, as CPU runs have always
    computed (their losses are pinned bit for bit: tests/fixtures/reference_losses.json), where
    memory is not the limit and compiling costs more than it saves.  A value set wins."""
    cuda = device_type == "cuda"
    chunk = m.loss_chunk_tokens
    if chunk is None:
        chunk = auto_loss_chunk_tokens(vocab_size) if cuda else 0
    return {"compile": bool(cuda if m.compile is None else m.compile), "loss_chunk_tokens": int(chunk)}


def check(m: Any, resolved: bool = False) -> None:
    """The model's checks, for the `model.*` settings (None: a default still
    to be resolved) or a GPTConfig (`resolved`: attention must then be a
    concrete backend).  Raises ConfigError naming the first bad key."""
    for key in ("n_layer", "n_head", "n_embd", "mlp_ratio", "vocab_multiple"):
        _require(getattr(m, key) > 0, key, f"must be positive, got {getattr(m, key)}")
    row = family(m.family)
    if m.head_dim is None:
        _require(m.n_embd % m.n_head == 0, "n_embd", f"{m.n_embd} is not divisible by model.n_head={m.n_head}")
    else:
        _require(m.head_dim > 0, "head_dim", f"must be positive or null (n_embd / n_head), got {m.head_dim}")
        _require(
            row.own_head_dim or m.head_dim * m.n_head == m.n_embd,
            "head_dim",
            f"{m.head_dim}: family {m.family}'s head size is model.n_embd / model.n_head; leave it null",
        )
    head_dim = m.head_dim or m.n_embd // m.n_head
    kv = m.n_kv_head if m.n_kv_head is not None else m.n_head
    _require(
        kv > 0 and m.n_head % kv == 0, "n_kv_head", f"{m.n_kv_head} must be positive and divide model.n_head={m.n_head}"
    )
    _require(m.mlp_hidden is None or m.mlp_hidden > 0, "mlp_hidden", f"must be positive, got {m.mlp_hidden}")
    _require(m.mlp_multiple > 0, "mlp_multiple", f"must be positive, got {m.mlp_multiple}")
    _require(m.rope_theta > 0, "rope_theta", f"must be positive, got {m.rope_theta}")
    _require(
        m.activation_checkpointing >= 0,
        "activation_checkpointing",
        f"must be 0 (off) or k >= 1 (every k-th block), got {m.activation_checkpointing}",
    )
    if row.rotary:
        _require(
            head_dim % 2 == 0,
            "n_embd" if m.head_dim is None else "head_dim",
            f"rotary embeddings need an even head dim, got {head_dim}",
        )
    qkv = " (its q/k/v biases are the family's, always there)" if row.qkv_bias else ""
    _require(row.biases or not m.bias, "bias", f"family {m.family} has no linear biases{qkv}; set model.bias=false")
    _check_rope_scaling(m)
    _check_sliding_window(m)
    backends = BACKENDS if resolved else ("auto", *BACKENDS)
    _require(m.attention in backends, "attention", f"unknown backend {m.attention!r}; choose one of {backends}")
    _require(0.0 <= m.dropout < 1.0, "dropout", f"must be in [0, 1), got {m.dropout}")
    _require(m.vocab_size is None or m.vocab_size > 1, "vocab_size", f"must be > 1, got {m.vocab_size}")
    if resolved:
        _require(isinstance(m.compile, bool), "compile", f"must be true or false here, got {m.compile!r}")
        _require(m.loss_chunk_tokens is not None, "loss_chunk_tokens", "must be a number of tokens here, got None")
    _require(
        m.loss_chunk_tokens is None or m.loss_chunk_tokens >= 0,
        "loss_chunk_tokens",
        f"must be >= 0 (0: the plain loss) or null (auto), got {m.loss_chunk_tokens}",
    )


def _check_rope_scaling(m: Any) -> None:
    if m.rope_scaling is None:
        # A value that would do nothing is more likely a mistake than a wish.
        for key in LLAMA3_KEYS:
            _require(getattr(m, key) is None, key, f"set to {getattr(m, key)} but model.rope_scaling is null (off)")
        return
    _require(
        m.rope_scaling in ROPE_SCALINGS,
        "rope_scaling",
        f"unknown type {m.rope_scaling!r}; choose one of {ROPE_SCALINGS} or null",
    )
    _require(
        family(m.family).rotary, "rope_scaling", f"scales rotary embeddings; family {m.family} has learned positions"
    )
    for key in LLAMA3_KEYS:
        _require(getattr(m, key) is not None, key, f"needed by model.rope_scaling={m.rope_scaling}")
    for key in ("rope_scaling_factor", "rope_scaling_low_freq_factor", "rope_scaling_original_max_seq_len"):
        _require(getattr(m, key) > 0, key, f"must be positive, got {getattr(m, key)}")
    # The blend between the two bounds divides by their difference.
    low, high = m.rope_scaling_low_freq_factor, m.rope_scaling_high_freq_factor
    _require(
        high > low, "rope_scaling_high_freq_factor", f"must exceed model.rope_scaling_low_freq_factor={low}, got {high}"
    )


def _check_sliding_window(m: Any) -> None:
    w = m.sliding_window
    if w is None:
        return
    _require(w > 0, "sliding_window", f"must be positive, got {w}")
    # A window at least as long as a sequence sees every earlier position of
    # it: the full causal attention megagpt computes.  So the window must
    # cover every sequence megagpt computes: training (data.seq_len,
    # config_checks and hf_import check it) and generation (generate.py stops
    # there), not necessarily max_seq_len (Mistral-7B: 4096 of 32768).


@dataclass(kw_only=True)
class GPTConfig(ModelConfig):
    """What the model is built from: ModelConfig's fields resolved (see the module doc)."""

    vocab_size: int = field()
    max_seq_len: int = field()
    attention: str = "sdpa"
    compile: bool = False
    loss_chunk_tokens: int = 0
    eod_id: Optional[int] = None

    def __post_init__(self):
        check(self, resolved=True)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            self.head_dim = self.n_embd // self.n_head
        if self.mlp_hidden is None:
            self.mlp_hidden = self.family_spec.mlp_width(self)
        if self.doc_mask and self.eod_id is None:
            raise ConfigError("model.doc_mask: needs the end-of-document token id (eod_id)")

    @classmethod
    def from_settings(
        cls,
        m: ModelConfig,
        *,
        vocab_size: int,
        seq_len: int,
        attention: str,
        eod_id: int | None = None,
        device_type: str = "cpu",
    ) -> "GPTConfig":
        """The model's config from the `model.*` settings (a ModelConfig or its
        DictConfig): every setting copied by name, then the defaults that need
        the data: vocab_size (model.vocab_size, else the tokenizer's
        `vocab_size`) rounded up to model.vocab_multiple for matmul-friendly
        shapes, and max_seq_len (model.max_seq_len, else data.seq_len =
        `seq_len`).  `attention`: the backend model.attention resolved to
        (attention.resolve_backend).  `device_type`: the device the model runs on, which
        model.compile and model.loss_chunk_tokens are resolved for (for_device)."""
        values = {f.name: getattr(m, f.name) for f in dataclasses.fields(ModelConfig)}
        v = m.vocab_size or vocab_size
        v = -(-v // m.vocab_multiple) * m.vocab_multiple
        values.update(
            vocab_size=v,
            max_seq_len=m.max_seq_len or seq_len,
            attention=attention,
            eod_id=eod_id,
            **for_device(m, device_type, v),
        )
        return cls(**values)

    @classmethod
    def from_record(cls, record: dict, ignore_unknown: bool = False) -> "GPTConfig":
        """A GPTConfig from its saved dict (`dataclasses.asdict` of one).  A key
        unknown here is a TypeError unless `ignore_unknown`."""
        values = dict(record)
        if ignore_unknown:
            known = {f.name for f in dataclasses.fields(cls)}
            values = {k: v for k, v in values.items() if k in known}
        return cls(**values)

    def for_inference(self, attention: str = "sdpa") -> "GPTConfig":
        """A copy set up for inference: the given attention backend, no
        activation checkpointing, no dropout, no compile, and SDPA's kernel
        torch's choice (a training run's measured kernel was measured for its shapes)."""
        return dataclasses.replace(
            self, attention=attention, activation_checkpointing=0, dropout=0.0, compile=False, sdpa_backend="auto"
        )

    @property
    def family_spec(self) -> Family:
        return family(self.family)

    @property
    def llama3_scaling(self) -> Llama3Scaling | None:
        """The RoPE frequency scaling model.rope_scaling asks for, or None."""
        if self.rope_scaling is None:
            return None
        return Llama3Scaling(
            factor=float(self.rope_scaling_factor),
            low_freq_factor=float(self.rope_scaling_low_freq_factor),
            high_freq_factor=float(self.rope_scaling_high_freq_factor),
            original_max_seq_len=int(self.rope_scaling_original_max_seq_len),
        )
