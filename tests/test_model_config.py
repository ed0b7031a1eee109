"""One model config (the `model.*` settings and GPTConfig, the same fields),
its checks in one place, records of older megagpt, and the family table the
model, the parameter count and the Hugging Face adapters read."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import megagpt.config
import megagpt.train
from megagpt.config import ConfigError, ModelConfig
from megagpt.config_checks import validate
from megagpt.engine import build_model_config
from megagpt.hf import ADAPTERS, BY_MODEL_TYPE, config_from_hf, from_hf, hf_config, to_hf
from megagpt.model import families
from megagpt.model.config import GPTConfig, check
from megagpt.model.families import FAMILIES, Family
from megagpt.model.gpt import GPT
from megagpt.model.layers import GeluMLP, SwiGLU, layer_norm, rms_norm


def make_cfg(*overrides: str):
    megagpt.config.register()
    with initialize_config_dir(config_dir=megagpt.train.CONF_DIR, version_base=None):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


# --- one config ----------------------------------------------------------------


def test_gptconfig_has_every_setting_under_its_name():
    settings = {f.name: f for f in dataclasses.fields(ModelConfig)}
    model = {f.name: f for f in dataclasses.fields(GPTConfig)}
    assert set(model) - set(settings) == {"eod_id"}
    assert set(settings) <= set(model)
    # The same defaults, except what a built model must have resolved.
    differ = {k for k in settings if settings[k].default != model[k].default}
    assert differ == {"vocab_size", "max_seq_len", "attention", "compile", "loss_chunk_tokens"}
    assert (model["compile"].default, model["loss_chunk_tokens"].default) == (False, 0)  # older records: plain
    assert model["vocab_size"].default is dataclasses.MISSING and model["max_seq_len"].default is dataclasses.MISSING


def test_from_settings_copies_every_field_and_resolves_the_defaults():
    m = ModelConfig(
        family="llama",
        n_layer=3,
        n_head=6,
        n_kv_head=None,
        n_embd=96,
        vocab_size=None,
        vocab_multiple=128,
        max_seq_len=None,
        mlp_hidden=None,
        mlp_ratio=3,
        mlp_multiple=64,
        dropout=0.1,
        bias=False,
        norm_eps=1e-6,
        init_std=0.01,
        rope_theta=5e5,
        tie_embeddings=False,
        attention="auto",
        doc_mask=True,
        activation_checkpointing=2,
        compile=True,
    )
    for settings in (m, OmegaConf.structured(m)):  # the dataclass or Hydra's node
        c = GPTConfig.from_settings(settings, vocab_size=1000, seq_len=77, attention="eager", eod_id=3)
        resolved = {
            "vocab_size": 1024,
            "max_seq_len": 77,
            "n_kv_head": 6,
            "head_dim": 16,  # 96 / 6
            "attention": "eager",
            "mlp_hidden": 256,  # 8/3 x 96 = 256, a multiple of 64
            "loss_chunk_tokens": 0,
        }  # null (auto): the plain loss on CPU, the default device
        for f in dataclasses.fields(ModelConfig):
            assert getattr(c, f.name) == resolved.get(f.name, getattr(m, f.name)), f.name
        assert c.eod_id == 3
    gpt2 = GPTConfig.from_settings(
        dataclasses.replace(m, family="gpt2", vocab_size=300, max_seq_len=512),
        vocab_size=1000,
        seq_len=77,
        attention="sdpa",
        eod_id=3,
    )
    assert (gpt2.mlp_hidden, gpt2.vocab_size, gpt2.max_seq_len) == (3 * 96, 384, 512)


def test_build_model_config_is_from_settings():
    cfg = make_cfg("model=llama-tiny", "model.activation_checkpointing=1", "data.seq_len=64")
    c = build_model_config(cfg, 4000, "sdpa", 0)
    assert c == GPTConfig.from_settings(cfg.model, vocab_size=4000, seq_len=64, attention="sdpa", eod_id=0)
    assert (c.vocab_size, c.max_seq_len, c.n_kv_head, c.mlp_hidden, c.activation_checkpointing) == (4032, 64, 2, 384, 1)


CHECKS = [  # (overrides, the one line validate() and GPTConfig both raise)
    (["model.n_embd=130"], "model.n_embd: 130 is not divisible by model.n_head=4"),
    (["model.n_kv_head=3"], "model.n_kv_head: 3 must be positive and divide model.n_head=4"),
    (
        ["model=llama-tiny", "model.n_kv_head=null", "model.n_embd=12"],
        "model.n_embd: rotary embeddings need an even head dim, got 3",
    ),
    (
        ["model.family=mamba"],
        "model.family: unknown family 'mamba'; choose one of ('gpt2', 'llama', 'mistral', 'qwen2', 'qwen3')",
    ),
    (["model.family=mistral"], "model.bias: family mistral has no linear biases; set model.bias=false"),
    (["model.rope_scaling=llama3"], "model.rope_scaling: scales rotary embeddings; family gpt2 has learned positions"),
    (
        ["model=llama-tiny", "model.rope_scaling=yarn"],
        "model.rope_scaling: unknown type 'yarn'; choose one of ('llama3',) or null",
    ),
    (
        ["model=llama-tiny", "model.rope_scaling=llama3", "model.rope_scaling_factor=8"],
        "model.rope_scaling_low_freq_factor: needed by model.rope_scaling=llama3",
    ),
    (
        ["model=llama-tiny", "model.rope_scaling_factor=8"],
        "model.rope_scaling_factor: set to 8.0 but model.rope_scaling is null (off)",
    ),
    (
        [
            "model=llama-tiny",
            "model.rope_scaling=llama3",
            "model.rope_scaling_factor=8",
            "model.rope_scaling_low_freq_factor=4",
            "model.rope_scaling_high_freq_factor=4",
            "model.rope_scaling_original_max_seq_len=16",
        ],
        "model.rope_scaling_high_freq_factor: must exceed model.rope_scaling_low_freq_factor=4.0, got 4.0",
    ),
    (["model=llama-tiny", "model.sliding_window=0"], "model.sliding_window: must be positive, got 0"),
    (
        ["model.activation_checkpointing=-1"],
        "model.activation_checkpointing: must be 0 (off) or k >= 1 (every k-th block), got -1",
    ),
    (["model.dropout=1.0"], "model.dropout: must be in [0, 1), got 1.0"),
    (["model.mlp_hidden=0"], "model.mlp_hidden: must be positive, got 0"),
    (["model.n_layer=0"], "model.n_layer: must be positive, got 0"),
]


@pytest.mark.parametrize("overrides, line", CHECKS)
def test_model_checks_are_one_function(overrides, line):
    cfg = make_cfg(*overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg, 1)
    assert str(e.value) == line
    settings = {f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(ModelConfig)}
    settings.update(vocab_size=64, max_seq_len=8, attention="sdpa")
    with pytest.raises(ConfigError) as e:
        GPTConfig(**settings)
    assert str(e.value) == line


def test_attention_auto_is_a_setting_not_a_backend():
    check(ModelConfig(attention="auto"))
    with pytest.raises(ConfigError, match=r"^model.attention: unknown backend 'auto'"):
        GPTConfig(vocab_size=64, max_seq_len=8, attention="auto")
    with pytest.raises(ConfigError, match=r"^model.doc_mask: "):
        GPTConfig(vocab_size=64, max_seq_len=8, doc_mask=True)


def test_for_inference_is_a_copy():
    c = GPTConfig(
        vocab_size=64,
        max_seq_len=8,
        family="llama",
        n_embd=32,
        dropout=0.2,
        activation_checkpointing=2,
        compile=True,
        attention="eager",
        doc_mask=True,
        eod_id=0,
    )
    before = dataclasses.asdict(c)
    inf = c.for_inference("sdpa")
    assert dataclasses.asdict(c) == before  # untouched
    assert (inf.attention, inf.activation_checkpointing, inf.dropout, inf.compile) == ("sdpa", 0, 0.0, False)
    assert {k: v for k, v in dataclasses.asdict(inf).items() if before[k] != v} == {
        "attention": "sdpa",
        "activation_checkpointing": 0,
        "dropout": 0.0,
        "compile": False,
    }


# --- records ---------------------------------------------------------------------

# Some of megagpt_state.json's "model" record (a GPTConfig's dict): the fields not given keep their defaults.
RECORD = {
    "vocab_size": 4096,
    "max_seq_len": 128,
    "family": "llama",
    "n_layer": 2,
    "n_head": 4,
    "n_kv_head": 2,
    "n_embd": 128,
    "mlp_hidden": 384,
    "mlp_multiple": 256,
    "dropout": 0.0,
    "bias": False,
    "norm_eps": 1e-05,
    "init_std": 0.02,
    "rope_theta": 10000.0,
    "tie_embeddings": False,
    "attention": "sdpa",
    "doc_mask": True,
    "eod_id": 0,
    "activation_checkpointing": 1,
}


def test_records_load():
    c = GPTConfig.from_record(RECORD)
    assert all(getattr(c, k) == v for k, v in RECORD.items())
    assert GPTConfig.from_record(dataclasses.asdict(c)) == c  # records round-trip
    with pytest.raises(TypeError):
        GPTConfig.from_record({**RECORD, "no_such_field": 1})
    assert GPTConfig.from_record({**RECORD, "no_such_field": 1}, ignore_unknown=True) == c
    # An exported config.json: its "megagpt" record, written for inference.
    assert config_from_hf(hf_config(c.for_inference("sdpa"), 0)) == c.for_inference("sdpa")


# --- the family table --------------------------------------------------------------


def test_every_family_has_a_hugging_face_adapter():
    assert set(ADAPTERS) == set(FAMILIES)
    assert {a.model_type: a.architecture for a in BY_MODEL_TYPE.values()} == {
        "gpt2": "GPT2LMHeadModel",
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
    }


def _model(family, seed=0, **kw):
    base = dict(
        vocab_size=96, max_seq_len=16, family=family, n_layer=2, n_head=4, n_embd=32, bias=FAMILIES[family].biases
    )
    model = GPT(GPTConfig(**{**base, **kw}))
    model.init_weights(seed)
    return model.eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tied", [True, False])
def test_hf_mapping_round_trips(family, tied):
    rotary = FAMILIES[family].rotary
    model = _model(family, tie_embeddings=tied, n_kv_head=2 if rotary else None, bias=family == "gpt2")
    sd, c = model.state_dict(), model.cfg
    hf = to_hf(sd, c)
    back = from_hf(hf, c)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    shape = config_from_hf({k: v for k, v in hf_config(c, 0).items() if k != "megagpt"})
    for key in (
        "family",
        "n_layer",
        "n_head",
        "n_kv_head",
        "n_embd",
        "head_dim",
        "mlp_hidden",
        "vocab_size",
        "max_seq_len",
        "tie_embeddings",
        "bias",
        "norm_eps",
        "rope_theta",
        "init_std",
        "rope_scaling",
        "sliding_window",
    ):
        assert getattr(shape, key) == getattr(c, key), key


def _old_count(model) -> int:
    """train.py's count before the table (ZeRO-3 aside)."""
    seen, n = set(), 0
    skip = ("wpe.",) if model.cfg.tie_embeddings else ("wpe.", "wte.")
    for name, p in model.named_parameters():
        if id(p) in seen or name.startswith(skip):
            continue
        seen.add(id(p))
        n += p.numel()
    return n


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tied", [True, False])
def test_matmul_params(family, tied):
    model = _model(family, tie_embeddings=tied)
    n = model.num_params(matmul_only=True)
    assert n == _old_count(model)
    assert n == model.num_params() - (0 if tied else 96 * 32)
    positions = 16 * 32 if FAMILIES[family].learned_positions else 0
    assert model.num_params(exclude_position=False) == model.num_params() + positions


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_a_new_family_is_a_table_row(monkeypatch, positions):
    """A family the code has never heard of, from its row alone: validated,
    built, run, counted; only the Hugging Face side wants an adapter."""
    row = Family(
        "hybrid",
        "test",
        positions=positions,
        norm=rms_norm if positions == "learned" else layer_norm,
        mlp=SwiGLU if positions == "learned" else GeluMLP,
        mlp_width=lambda m: 2 * m.n_embd,
    )
    monkeypatch.setitem(families.FAMILIES, "hybrid", row)
    check(ModelConfig(family="hybrid"))
    c = GPTConfig.from_settings(ModelConfig(family="hybrid", n_embd=32), vocab_size=90, seq_len=16, attention="sdpa")
    assert c.mlp_hidden == 64 and c.vocab_size == 128
    model = GPT(c)
    model.init_weights(0)
    assert hasattr(model, "wpe") == (positions == "learned")
    norm = torch.nn.RMSNorm if positions == "learned" else torch.nn.LayerNorm
    assert isinstance(model.ln_f, norm) and isinstance(model.blocks[0].ln_1, norm)
    assert isinstance(model.blocks[0].mlp, SwiGLU if positions == "learned" else GeluMLP)
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(x[:, :-1], x[:, 1:])
    assert abs(loss.item() - torch.log(torch.tensor(128.0)).item()) < 0.2
    assert model.num_params() == sum(p.numel() for p in model.parameters()) - (16 * 32 if hasattr(model, "wpe") else 0)
    with pytest.raises(ValueError, match="no Hugging Face adapter"):
        to_hf(model.state_dict(), c)
