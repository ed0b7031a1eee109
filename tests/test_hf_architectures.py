"""The Hugging Face architectures megagpt maps exactly, from folders that
transformers itself writes: LlamaForCausalLM (grouped-query attention, tied
or untied head, biases, rope_scaling llama3 in both its config.json forms),
GPT2LMHeadModel (OpenAI's prefix-less tensor names too) and
MistralForCausalLM (no sliding window, or one as long as the sequences megagpt computes).

Logits and loss equal transformers'; anything else is refused in one line
naming config.json's architectures; import -> export gives the same tensors
and an equivalent config.json; the per-tensor source table (hf.sources) is
from_hf, covers every tensor transformers needs, and touches no data.
Small random models only: CPU, offline, seconds."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402  (after the offline switches)

from megagpt.export import write_hf_model  # noqa: E402
from megagpt.hf import HFConfigError, from_hf, load_hf_folder, load_hf_state, parse_hf_config, read_hf_config, sources  # noqa: E402
from megagpt.model.gpt import GPT  # noqa: E402
from megagpt.model.layers import Llama3Scaling, rope_inv_freq  # noqa: E402

V, SEQ = 300, 64  # vocabulary, max_position_embeddings (and the longest sequence tested)
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}  # 16 < SEQ: the scaling matters


def _llama(**kw):
    base = dict(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 5e5},
    )
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**base, **kw}))


def _mistral(**kw):
    base = dict(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        rms_norm_eps=1e-5,
    )
    return transformers.MistralForCausalLM(transformers.MistralConfig(**{**base, **kw}))


def _gpt2(**kw):
    base = dict(vocab_size=V, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**base, **kw}))


MODELS = {  # name: (builder, architecture)
    "llama_gqa_tied": (lambda: _llama(tie_word_embeddings=True), "LlamaForCausalLM"),
    "llama_untied_bias": (
        lambda: _llama(num_key_value_heads=4, tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
        "LlamaForCausalLM",
    ),
    "llama3_scaled": (lambda: _llama(rope_parameters=dict(LLAMA3)), "LlamaForCausalLM"),
    "gpt2": (lambda: _gpt2(), "GPT2LMHeadModel"),
    "gpt2_untied": (
        lambda: _gpt2(tie_word_embeddings=False, n_inner=96, activation_function="gelu_pytorch_tanh"),
        "GPT2LMHeadModel",
    ),
    "mistral_no_window": (lambda: _mistral(sliding_window=None), "MistralForCausalLM"),
    "mistral_window_eq_len": (lambda: _mistral(sliding_window=SEQ, tie_word_embeddings=True), "MistralForCausalLM"),
}
# Tensors a transformers folder may hold that its model does not need.
NOT_NEEDED = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from transformers' small init, so that every mapping
    mistake shows in the logits: norm gains near 1, everything else N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = p.dim() == 1 and name.endswith("weight") and "bias" not in name
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if gain else 0.0))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (name, (build, _)) in enumerate(MODELS.items()):
        model = build()
        _randomize(model, seed=i)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def _tokens(length=SEQ, seed=0):
    return torch.randint(0, V, (2, length), generator=torch.Generator().manual_seed(seed))


def _transformers_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


def _agree(ours: GPT, theirs, ids) -> None:
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
        assert (a - b).abs().max().item() <= 1e-4
        loss_a, loss_b = ours(ids[:, :-1], ids[:, 1:]).item(), theirs(ids, labels=ids).loss.item()
    assert abs(loss_a - loss_b) <= 1e-5, (loss_a, loss_b)


# --- logits ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_match_transformers(folders, name):
    folder = folders[name]
    c = read_hf_config(folder)
    ours, theirs = load_hf_folder(str(folder)), _transformers_model(folder)
    assert ours.cfg == dataclasses.replace(c.for_inference("sdpa"), doc_mask=False)
    assert type(theirs).__name__ == MODELS[name][1]
    hf = theirs.config
    assert (c.vocab_size, c.max_seq_len, c.n_layer, c.tie_embeddings) == (V, SEQ, 2, hf.tie_word_embeddings)
    if c.family != "gpt2":
        assert (c.n_kv_head, c.mlp_hidden, c.norm_eps) == (hf.num_key_value_heads, hf.intermediate_size, 1e-5)
    _agree(ours, theirs, _tokens())


def _rewrite_config(src, dst, edit) -> None:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))


def test_llama3_scaling_matters_and_reads_both_config_forms(folders, tmp_path):
    scaled = folders["llama3_scaled"]
    c = read_hf_config(scaled)
    assert (
        c.rope_scaling,
        c.rope_scaling_factor,
        c.rope_scaling_low_freq_factor,
        c.rope_scaling_high_freq_factor,
        c.rope_scaling_original_max_seq_len,
        c.rope_theta,
    ) == ("llama3", 4.0, 1.0, 4.0, 16, 10000.0)

    def unscaled(cfg):
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}

    def as_transformers_4(cfg):  # rope_theta at the top, the scaling under rope_scaling ("type" as older files)
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = {**rope, "type": rope.pop("rope_type")}

    _rewrite_config(scaled, tmp_path / "unscaled", unscaled)
    _rewrite_config(scaled, tmp_path / "v4", as_transformers_4)
    assert "rope_scaling" in json.loads((tmp_path / "v4" / "config.json").read_text())
    assert read_hf_config(tmp_path / "v4") == c
    off = dict.fromkeys(
        (
            "rope_scaling",
            "rope_scaling_factor",
            "rope_scaling_low_freq_factor",
            "rope_scaling_high_freq_factor",
            "rope_scaling_original_max_seq_len",
        )
    )
    assert read_hf_config(tmp_path / "unscaled") == dataclasses.replace(c, **off)
    ids = _tokens()
    models = {
        name: load_hf_folder(str(f))
        for name, f in (("scaled", scaled), ("v4", tmp_path / "v4"), ("unscaled", tmp_path / "unscaled"))
    }
    for name in ("v4", "unscaled"):
        _agree(models[name], _transformers_model(tmp_path / name), ids)
    with torch.no_grad():
        assert torch.equal(models["scaled"](ids), models["v4"](ids))
        assert (models["scaled"](ids) - models["unscaled"](ids)).abs().max().item() > 1e-2


def test_openai_gpt2_layout_loads(folders, tmp_path):
    """openai-community/gpt2 stores its tensors without `transformer.` and
    with attention-mask buffers; megagpt reads the same model from it."""
    src = folders["gpt2"]
    dst = tmp_path / "openai"
    shutil.copytree(src, dst)
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(src / "model.safetensors").items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(SEQ, SEQ)).view(1, 1, SEQ, SEQ)
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    ids = _tokens()
    with torch.no_grad():
        assert torch.equal(load_hf_folder(str(dst))(ids), load_hf_folder(str(src))(ids))


# --- rope ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head_dim, theta, factor, low, high, original",
    [
        (64, 500000.0, 32.0, 1.0, 4.0, 8192),  # Llama 3.2 1B / 3B
        (128, 500000.0, 8.0, 1.0, 4.0, 8192),  # Llama 3.1 8B
        (16, 10000.0, 4.0, 1.0, 4.0, 16),
        (32, 10000.0, 2.5, 0.5, 3.0, 100),
    ],
)
def test_llama3_inv_freq_equals_transformers(head_dim, theta, factor, low, high, original):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }
    cfg = transformers.LlamaConfig(
        hidden_size=4 * head_dim, num_attention_heads=4, max_position_embeddings=4 * original, rope_parameters=rope
    )
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, torch.device("cpu"))
    ours = rope_inv_freq(head_dim, theta, Llama3Scaling(factor, low, high, original))
    plain = rope_inv_freq(head_dim, theta)
    assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == (head_dim // 2,)
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=0)
    # Short wavelengths kept, long ones slowed by `factor`, the rest blended between the two.
    wavelen = 2 * math.pi / plain
    short, long = wavelen < original / high, wavelen > original / low
    assert long.any() and torch.equal(ours[short], plain[short]) and torch.equal(ours[long], plain[long] / factor)
    middle = ~short & ~long
    assert ((ours[middle] < plain[middle]) & (ours[middle] > plain[middle] / factor)).all()


# --- refusals ----------------------------------------------------------------------------------


def _llama_json(**edits):
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": V,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": SEQ,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }
    return {**cfg, **edits}


def _mistral_json(**edits):
    return {**_llama_json(architectures=["MistralForCausalLM"], model_type="mistral"), **edits}


def _gpt2_json(**edits):
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": V,
        "n_positions": SEQ,
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        **edits,
    }


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
REFUSED = {  # name: (config.json, a piece of the one-line message)
    "yarn": (_llama_json(rope_scaling=YARN), "rope_scaling type 'yarn' is not supported (supported: llama3)"),
    "linear_v5": (
        _llama_json(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
        "rope_parameters type 'linear' is not supported (supported: llama3)",
    ),
    "dynamic_old_key": (
        _llama_json(rope_scaling={"type": "dynamic", "factor": 2.0}),
        "rope_scaling type 'dynamic' is not supported",
    ),
    "llama3_incomplete": (
        _llama_json(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
        "rope_scaling type 'llama3' lacks low_freq_factor, high_freq_factor",
    ),
    "partial_rotary": (_llama_json(partial_rotary_factor=0.5), "partial_rotary_factor 0.5 is not supported"),
    "bias_split": (
        _llama_json(attention_bias=True, mlp_bias=False),
        "attention_bias true with mlp_bias false is not supported (megagpt has one bias switch",
    ),
    "hidden_act": (_llama_json(hidden_act="gelu"), "hidden_act 'gelu' is not supported (supported: silu, swish)"),
    "head_dim": (
        _llama_json(head_dim=32),
        "head_dim 32 is not supported: megagpt's head size is hidden_size / num_attention_heads = 16",
    ),
    "gemma2": (
        _llama_json(architectures=["Gemma2ForCausalLM"], model_type="gemma2"),
        "architecture 'Gemma2ForCausalLM' is not supported (supported: GPT2LMHeadModel, LlamaForCausalLM, "
        "MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)",
    ),
    "no_architectures": (
        {k: v for k, v in _llama_json().items() if k != "architectures"},
        "megagpt needs exactly one architecture",
    ),
    "model_type_mismatch": (_llama_json(model_type="mistral"), "model_type 'mistral' does not match"),
    "quantized": (
        _llama_json(quantization_config={"quant_method": "gptq", "bits": 4}),
        "quantized weights (quantization_config) are not supported",
    ),
    "wrong_type": (_llama_json(num_hidden_layers="2"), "num_hidden_layers '2' is not int"),
    "kv_heads": (
        _llama_json(num_key_value_heads=3),
        "megagpt cannot build it: model.n_kv_head: 3 must be positive and divide model.n_head=4",
    ),
    "gpt2_relu": (
        _gpt2_json(activation_function="relu"),
        "activation_function 'relu' is not supported (supported: gelu_new, gelu_pytorch_tanh)",
    ),
    "gpt2_erf_gelu": (_gpt2_json(activation_function="gelu"), "activation_function 'gelu' is not supported"),
    "gpt2_layer_idx": (
        _gpt2_json(scale_attn_by_inverse_layer_idx=True),
        "scale_attn_by_inverse_layer_idx true is not supported",
    ),
    "gpt2_reorder": (_gpt2_json(reorder_and_upcast_attn=True), "reorder_and_upcast_attn true is not supported"),
    "gpt2_cross": (_gpt2_json(add_cross_attention=True), "add_cross_attention true is not supported"),
    "gpt2_unscaled": (_gpt2_json(scale_attn_weights=False), "scale_attn_weights false"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_is_one_line(tmp_path, name):
    cfg, piece = REFUSED[name]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFConfigError) as e:
        read_hf_config(tmp_path)
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in msg
    assert msg.startswith(f"{tmp_path / 'config.json'}: architectures {cfg.get('architectures')!r}: "), msg
    assert piece in msg, msg


def test_unreadable_config_is_one_line(tmp_path):
    with pytest.raises(HFConfigError, match=r"config.json: cannot read it: FileNotFoundError"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text('{\n  "architectures": [\n')
    with pytest.raises(HFConfigError) as e:
        read_hf_config(tmp_path)
    assert "cannot read it: JSONDecodeError" in str(e.value) and "\n" not in str(e.value)


def test_any_window_reads_and_the_training_length_is_held_to_it():
    """Mistral-7B's window (4096) is shorter than its positions (32768): it
    reads; what must fit the window is every sequence megagpt computes."""
    from test_config import make_cfg

    from megagpt.config_checks import validate

    c = parse_hf_config(_mistral_json(sliding_window=SEQ // 2))
    assert (c.family, c.sliding_window, c.max_seq_len, c.bias) == ("mistral", SEQ // 2, SEQ, False)
    validate(make_cfg("model.family=mistral", "model.bias=false", "model.sliding_window=256", "data.seq_len=256"))
    with pytest.raises(ValueError, match=r"^model.sliding_window: 255 is shorter than data.seq_len=256; "):
        validate(make_cfg("model.family=mistral", "model.bias=false", "model.sliding_window=255", "data.seq_len=256"))


@pytest.mark.parametrize(
    "cfg", [_llama_json(), _mistral_json(sliding_window=None), _gpt2_json()], ids=["llama", "mistral", "gpt2"]
)
def test_absent_fields_take_transformers_defaults(cfg):
    """Only architectures and model_type (and Mistral's window, whose default
    4096 megagpt refuses) in config.json: megagpt reads what transformers does."""
    keep = ("architectures", "model_type", "sliding_window")
    minimal = {k: v for k, v in cfg.items() if k in keep}
    c = parse_hf_config(minimal)
    hf = transformers.AutoConfig.for_model(**{k: v for k, v in minimal.items() if k != "architectures"})
    gpt2 = c.family == "gpt2"
    expected = {
        "vocab_size": hf.vocab_size,
        "max_seq_len": hf.max_position_embeddings,
        "n_layer": hf.num_hidden_layers,
        "n_head": hf.num_attention_heads,
        "n_embd": hf.hidden_size,
        "tie_embeddings": hf.tie_word_embeddings,
        "norm_eps": hf.layer_norm_epsilon if gpt2 else hf.rms_norm_eps,
        "mlp_hidden": (hf.n_inner or 4 * hf.n_embd) if gpt2 else hf.intermediate_size,
    }
    if not gpt2:
        expected.update(
            n_kv_head=hf.num_key_value_heads,
            rope_theta=hf.rope_parameters["rope_theta"],
            bias=getattr(hf, "attention_bias", False),
        )
    assert {k: getattr(c, k) for k in expected} == expected


# --- round trip --------------------------------------------------------------------------------

# config.json fields transformers builds the model from, per architecture.
FIELDS = {
    "LlamaForCausalLM": (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
        "rope_parameters",
        "attention_bias",
        "mlp_bias",
    ),
    "GPT2LMHeadModel": (
        "vocab_size",
        "n_positions",
        "n_embd",
        "n_layer",
        "n_head",
        "activation_function",
        "layer_norm_epsilon",
        "tie_word_embeddings",
        "scale_attn_weights",
        "scale_attn_by_inverse_layer_idx",
        "reorder_and_upcast_attn",
        "add_cross_attention",
    ),
}
FIELDS["MistralForCausalLM"] = (*FIELDS["LlamaForCausalLM"][:-2], "sliding_window")
EQUIVALENT = {"activation_function": {"gelu_pytorch_tanh": "gelu_new"}}  # the same tanh GELU


@pytest.mark.parametrize("name", sorted(MODELS))
def test_import_export_round_trip(folders, tmp_path, name):
    src, out = folders[name], tmp_path / "export"
    write_hf_model(load_hf_folder(str(src)), str(out))
    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)

    a, b = (transformers.AutoConfig.from_pretrained(d, local_files_only=True) for d in (src, out))
    fields = FIELDS[MODELS[name][1]]
    same = {k: EQUIVALENT[k].get(getattr(a, k), getattr(a, k)) if k in EQUIVALENT else getattr(a, k) for k in fields}
    assert {k: getattr(b, k) for k in fields} == same
    if MODELS[name][1] == "GPT2LMHeadModel":  # n_inner null is 4 x n_embd
        assert b.n_inner == (a.n_inner or 4 * a.n_embd)
    rope = a.to_dict().get("rope_parameters") or {}
    if rope.get("rope_type") == "llama3":  # also readable by transformers 4.x
        assert json.loads((out / "config.json").read_text())["rope_scaling"] == {
            k: v for k, v in rope.items() if k != "rope_theta"
        }
    assert parse_hf_config(json.loads((out / "config.json").read_text())) == read_hf_config(src)
    ids = _tokens(seed=1)
    with torch.no_grad():
        exported, original = _transformers_model(out)(ids).logits, _transformers_model(src)(ids).logits
    if same != {k: getattr(a, k) for k in fields}:  # gelu_new for gelu_pytorch_tanh: other rounding
        torch.testing.assert_close(exported, original, atol=1e-5, rtol=0)
    else:
        assert torch.equal(exported, original)


# --- the source table --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sources_are_from_hf_and_cover_the_folder(folders, name):
    folder = folders[name]
    c = read_hf_config(folder)
    hf = load_file(folder / "model.safetensors")
    table = sources(c, hf.keys())
    assert list(table) == [n for n, _ in GPT(c).named_parameters()]  # a tied head left out
    assert ("lm_head.weight" in table) == (not c.tie_embeddings)
    assembled = {k: s.combine([hf[n] for n in s.names]) for k, s in table.items()}
    reference = from_hf(hf, c)
    assert reference.keys() - assembled.keys() == ({"lm_head.weight"} if c.tie_embeddings else set())
    assert all(torch.equal(assembled[k], reference[k]) for k in assembled)
    assert all(torch.equal(v, reference[k]) for k, v in load_hf_state(str(folder), c).items())
    used = [n for s in table.values() for n in s.names]
    assert len(used) == len(set(used))  # each transformers tensor feeds one megagpt tensor
    needed = {n for n in hf if not n.endswith(NOT_NEEDED)} - ({"lm_head.weight"} if c.tie_embeddings else set())
    assert set(used) == needed


def test_sources_of_a_full_size_model_read_no_data():
    """Llama 3.2 1B's shapes: the table is built from the config alone, and
    its combine gives every parameter's shape from tensors without storage."""
    cfg = _llama_json(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        rope_parameters={**LLAMA3, "rope_theta": 500000.0, "factor": 32.0, "original_max_position_embeddings": 8192},
    )
    c = parse_hf_config(cfg)
    assert c.llama3_scaling == Llama3Scaling(32.0, 1.0, 4.0, 8192)
    with torch.device("meta"):
        model = GPT(c)
    shapes = {}  # the transformers tensors' shapes, from the class's layout
    H, KV, D, F, C = 32, 8, 64, 8192, 2048
    for i in range(16):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (H * D, C),
                p + "self_attn.k_proj.weight": (KV * D, C),
                p + "self_attn.v_proj.weight": (KV * D, C),
                p + "self_attn.o_proj.weight": (C, H * D),
                p + "mlp.gate_proj.weight": (F, C),
                p + "mlp.up_proj.weight": (F, C),
                p + "mlp.down_proj.weight": (C, F),
                p + "input_layernorm.weight": (C,),
                p + "post_attention_layernorm.weight": (C,),
            }
        )
    shapes.update({"model.embed_tokens.weight": (128256, C), "model.norm.weight": (C,)})
    table = sources(c)
    assert {n for s in table.values() for n in s.names} == set(shapes)
    for name, p in model.named_parameters():
        parts = [torch.empty(shapes[n], device="meta") for n in table[name].names]
        assert table[name].combine(parts).shape == p.shape, name
