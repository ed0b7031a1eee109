"""The Qwen families: Qwen2ForCausalLM (Qwen2, Qwen2.5: biases on q/k/v only)
and Qwen3ForCausalLM (RMSNorm on each head of q and k, no biases, a head size
of its own), from config.json files as Qwen publishes them, shrunk only in
width, depth and vocabulary: transformers builds a random model from each and
saves it; megagpt imports it (model.init_from's loader), computes the same
loss, exports it back bit for bit and generates the same greedy tokens.
Small random models: CPU, offline, seconds (the torchrun job is marked slow)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402  (after the offline switches)
from test_hf_architectures import _randomize  # noqa: E402

from megagpt import hf_import  # noqa: E402
from megagpt.engine import init_weights  # noqa: E402
from megagpt.export import write_hf_model  # noqa: E402
from megagpt.generate import generate  # noqa: E402
from megagpt.hf import HFConfigError, load_hf_folder, parse_hf_config, read_hf_config, sources  # noqa: E402
from megagpt.model.gpt import GPT  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# The published config.json files, field for field
# (huggingface.co/Qwen/<name>/blob/main/config.json).
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 896,
    "initializer_range": 0.02,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 24,
    "model_type": "qwen2",
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1",
    "use_cache": True,
    "use_mrope": False,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_mrope": False,
    "use_sliding_window": False,
    "vocab_size": 152064,
}
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "max_window_layers": 28,
    "model_type": "qwen3",
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
V = 320  # the shrunk vocabulary

# Shrunk in width, depth and vocabulary only: the heads (query / key-value) stay as published;
# Qwen3's head size stays twice hidden_size / num_attention_heads, as in Qwen3-0.6B.
MODELS = {
    "qwen2.5-0.5b": ({**QWEN25_05B, "hidden_size": 112, "intermediate_size": 304}, "tied"),
    "qwen2.5-7b": ({**QWEN25_7B, "hidden_size": 224, "intermediate_size": 592}, "untied"),
    "qwen3-0.6b": ({**QWEN3_06B, "hidden_size": 64, "head_dim": 8, "intermediate_size": 192}, "tied"),
}
for _cfg, _ in MODELS.values():
    _cfg.update(num_hidden_layers=2, max_window_layers=2, vocab_size=V)


def _build(cfg: dict):
    return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg), dtype=torch.float32)


def save_published(cfg: dict, folder: Path, seed: int) -> Path:
    """A random transformers model built from config.json `cfg` in fp32 (not
    its torch_dtype, bfloat16), saved by save_pretrained (in several shards)
    with that config.json as published."""
    model = _build(cfg)
    _randomize(model, seed)
    model.save_pretrained(folder, max_shard_size="200KB")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))  # the published fields, as they are
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    return {name: save_published(cfg, root / name, seed=i) for i, (name, (cfg, _)) in enumerate(MODELS.items())}


def _transformers_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, dtype=torch.float32
    ).eval()  # fp32, whatever config.json's torch_dtype says


def _imported(folder) -> GPT:
    """The model as model.init_from loads it: the folder checked, then filled one module at a time."""
    source = hf_import.open_folder(str(folder))
    model = GPT(source.config.for_inference("sdpa"))
    init_weights(model, seed=0, rank=0, sharded=False, load=hf_import.module_loader(source, source.config))
    return model.eval()


def _tokens(length=48, seed=0):
    return torch.randint(0, V, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_published_config_reads_as_the_family(folders, name):
    cfg, head = MODELS[name]
    c = read_hf_config(folders[name])
    qwen3 = cfg["model_type"] == "qwen3"
    assert (c.family, c.bias, c.tie_embeddings) == (cfg["model_type"], False, head == "tied")
    assert (c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.mlp_hidden, c.vocab_size, c.max_seq_len) == (
        2,
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["hidden_size"],
        cfg["intermediate_size"],
        V,
        cfg["max_position_embeddings"],
    )
    assert (c.rope_theta, c.norm_eps, c.sliding_window) == (1e6, 1e-6, None)
    assert c.head_dim == (8 if qwen3 else cfg["hidden_size"] // cfg["num_attention_heads"])
    if qwen3:
        assert c.head_dim * c.n_head != c.n_embd  # the explicit head size matters
    # the table covers every tensor transformers saved, each once, in the model's parameter order
    stored = {}
    for path in folders[name].glob("*.safetensors"):
        stored.update(load_file(path))
    assert len(list(folders[name].glob("*.safetensors"))) > 1
    table = sources(c, stored.keys())
    assert list(table) == [n for n, _ in GPT(c).named_parameters()]
    used = [n for s in table.values() for n in s.names]
    assert sorted(used) == sorted(stored)
    q_bias = {n for n in used if n.endswith("_proj.bias")}
    expected_bias = {f"model.layers.{i}.self_attn.{x}_proj.bias" for i in range(2) for x in "qkv"}
    assert q_bias == (set() if qwen3 else expected_bias)
    assert any(n.endswith("self_attn.q_norm.weight") for n in used) == qwen3


@pytest.mark.parametrize("name", sorted(MODELS))
def test_step0_loss_and_logits_match_transformers(folders, name):
    ours, theirs = _imported(folders[name]), _transformers_model(folders[name])
    assert type(theirs).__name__ == MODELS[name][0]["architectures"][0]
    ids = _tokens()
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() <= 1e-4
        loss_ours, loss_theirs = ours(ids[:, :-1], ids[:, 1:]).item(), theirs(ids, labels=ids).loss.item()
    assert abs(loss_ours - loss_theirs) <= 1e-5, (loss_ours, loss_theirs)


# config.json fields transformers builds the model from.
FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_parameters",
    "use_sliding_window",
    "sliding_window",
    "layer_types",
)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_import_export_round_trip_is_bit_for_bit(folders, tmp_path, name):
    src, out = folders[name], tmp_path / "export"
    write_hf_model(_imported(src), str(out))
    before, after = {}, load_file(out / "model.safetensors")
    for path in src.glob("*.safetensors"):
        before.update(load_file(path))
    assert after.keys() == before.keys()
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype == torch.float32 and torch.equal(after[key], tensor), key

    written = json.loads((out / "config.json").read_text())
    published = MODELS[name][0]
    assert (written["architectures"], written["model_type"]) == (published["architectures"], published["model_type"])
    assert (written["rope_theta"], written["use_sliding_window"]) == (1e6, False)
    a, b = (transformers.AutoConfig.from_pretrained(d, local_files_only=True) for d in (src, out))
    fields = FIELDS + (("head_dim", "attention_bias") if published["model_type"] == "qwen3" else ())
    assert {k: getattr(b, k) for k in fields} == {k: getattr(a, k) for k in fields}
    assert parse_hf_config(written) == read_hf_config(src)
    ids = _tokens(seed=1)
    with torch.no_grad():
        assert torch.equal(_transformers_model(out)(ids).logits, _transformers_model(src)(ids).logits)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_greedy_generation_matches_transformers(folders, name):
    prompt = [5, 17, 42, 8, 99]
    theirs = _transformers_model(folders[name])
    expected = theirs.generate(
        torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(prompt) :].tolist()
    assert len(expected) == 24
    assert generate(load_hf_folder(str(folders[name])), prompt, 24) == expected


def _write(tmp_path: Path, cfg: dict) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


REFUSED = {  # name: (config.json, a piece of the one-line message)
    "qwen2_sliding": (
        {**QWEN25_05B, "use_sliding_window": True},
        "use_sliding_window true is not supported (megagpt computes full causal attention only)",
    ),
    "qwen3_sliding": ({**QWEN3_06B, "use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window true"),
    "qwen3_bias": ({**QWEN3_06B, "attention_bias": True}, "attention_bias true is not supported"),
    "qwen3_head_dim_null": ({**QWEN3_06B, "head_dim": None}, "head_dim None is not int"),
    "qwen2_head_dim": (
        {**QWEN25_05B, "head_dim": 128},
        "head_dim 128 is not supported: megagpt's head size is hidden_size / num_attention_heads = 64",
    ),
    "qwen2_yarn": (
        {**QWEN25_05B, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
        "rope_scaling type 'yarn' is not supported",
    ),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_is_one_line(tmp_path, name):
    cfg, piece = REFUSED[name]
    with pytest.raises(HFConfigError) as e:
        read_hf_config(_write(tmp_path, cfg))
    msg = str(e.value)
    assert "\n" not in msg and piece in msg, msg
    assert msg.startswith(f"{tmp_path / 'config.json'}: architectures {cfg['architectures']!r}: "), msg


def test_init_from_names_config_json_once(tmp_path):
    """model.init_from's refusal: the file once, then the architectures and the problem."""
    path = tmp_path / "config.json"
    _write(tmp_path, {**QWEN25_05B, "use_sliding_window": True})
    with pytest.raises(hf_import.InitFromError) as e:
        hf_import.open_folder(str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(f"model.init_from: {path}: architectures ['Qwen2ForCausalLM']: use_sliding_window true")
    assert msg.count(str(path)) == 1, msg


@pytest.mark.parametrize("published", [QWEN25_05B, QWEN25_7B, QWEN3_06B], ids=["0.5b", "7b", "0.6b"])
def test_absent_fields_take_transformers_defaults(published):
    """Only architectures and model_type in config.json: megagpt reads what transformers does."""
    minimal = {k: published[k] for k in ("architectures", "model_type")}
    c = parse_hf_config(minimal)
    hf = transformers.AutoConfig.for_model(model_type=published["model_type"])
    heads = hf.num_attention_heads
    assert (c.vocab_size, c.max_seq_len, c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.mlp_hidden) == (
        hf.vocab_size,
        hf.max_position_embeddings,
        hf.num_hidden_layers,
        heads,
        hf.num_key_value_heads,
        hf.hidden_size,
        hf.intermediate_size,
    )
    assert (c.norm_eps, c.tie_embeddings, c.rope_theta) == (
        hf.rms_norm_eps,
        hf.tie_word_embeddings,
        hf.rope_parameters["rope_theta"],
    )
    assert c.head_dim == getattr(hf, "head_dim", hf.hidden_size // heads)


# --- settings ------------------------------------------------------------------------------------

HEAD_DIM_CHECKS = [
    (["model=llama-tiny", "model.head_dim=64"], "model.head_dim: 64: family llama's head size is model.n_embd / "),
    (["model=qwen3-tiny", "model.head_dim=0"], "model.head_dim: must be positive or null (n_embd / n_head), got 0"),
    (["model=qwen3-tiny", "model.head_dim=33"], "model.head_dim: rotary embeddings need an even head dim, got 33"),
    (["model=qwen2-tiny", "model.bias=true"], "model.bias: family qwen2 has no linear biases (its q/k/v biases are"),
]


@pytest.mark.parametrize("overrides, start", HEAD_DIM_CHECKS)
def test_settings_are_checked_in_one_line(overrides, start):
    from test_config import make_cfg

    from megagpt.config import ConfigError
    from megagpt.config_checks import validate

    with pytest.raises(ConfigError) as e:
        validate(make_cfg(*overrides), 1)
    assert str(e.value).startswith(start) and "\n" not in str(e.value), str(e.value)


def test_head_dim_shapes_the_attention():
    """qwen3-tiny: 4 heads of 64 at width 128, so q is 256 wide and the output projection reads 256."""
    model = _preset_model("qwen3-tiny", 4096)
    c, attn = model.cfg, model.blocks[0].attn
    assert (c.head_dim, c.n_head * c.head_dim, c.n_embd) == (64, 256, 128)
    assert tuple(attn.qkv.weight.shape) == ((4 + 2 * 2) * 64, 128) and tuple(attn.proj.weight.shape) == (128, 256)
    assert tuple(attn.q_norm.weight.shape) == tuple(attn.k_norm.weight.shape) == (64,)
    assert model.new_cache(1, 8).k[0].shape == (1, 2, 8, 64)


# --- presets ---------------------------------------------------------------------------------------


def _preset_model(name: str, vocab: int) -> GPT:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from megagpt.config import register
    from megagpt.engine import build_model_config

    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = OmegaConf.to_object(
            compose(config_name="config", overrides=[f"model={name}", "model.vocab_multiple=1", "data.seq_len=2048"])
        )
    with torch.device("meta"):
        return GPT(build_model_config(cfg, vocab, "sdpa"))


@pytest.mark.parametrize("preset,published", [("qwen2.5-0.5b", QWEN25_05B), ("qwen3-0.6b", QWEN3_06B)])
def test_presets_have_the_published_shapes(preset, published):
    """Every parameter of the preset's model has the shape of the published
    model's (built by transformers on the meta device from its config.json)."""
    ours = _preset_model(preset, published["vocab_size"])
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**published))
    c = ours.cfg
    assert (c.rope_theta, c.norm_eps, c.tie_embeddings) == (1e6, 1e-6, True)
    shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    for name, source in sources(c).items():
        got = source.combine([torch.empty(shapes[n], device="meta") for n in source.names]).shape
        assert tuple(got) == tuple(dict(ours.named_parameters())[name].shape), name
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters())
    assert count == {"qwen2.5-0.5b": 494_032_768, "qwen3-0.6b": 596_049_920}[preset]


@pytest.mark.parametrize("preset", ["qwen2-tiny", "qwen3-tiny"])
def test_tiny_presets_are_small(preset):
    model = _preset_model(preset, 4096)
    assert sum(p.numel() for p in model.parameters()) < 3e6
    assert model.cfg.family == preset.split("-")[0]


# --- continued pretraining ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["qwen2-tiny", "qwen3-tiny"])
def test_continued_pretraining_from_a_qwen_folder(tmp_path, preset):
    """A folder of the tiny preset's shape (and the published fields else),
    trained from under 2-rank ZeRO-3 with the preset named: the first loss is
    transformers' loss, and the export at the end is the family's class."""
    from helpers import make_dataset, torchrun
    from omegaconf import OmegaConf
    from test_init_from import SEQ, args, first_batch_loss, metrics, save_folder, vocab_of

    data_dir = make_dataset(tmp_path / "data", n_docs=160, docs_per_shard=8)
    shape = OmegaConf.load(REPO / "conf" / "model" / f"{preset}.yaml")
    published = QWEN3_06B if preset.startswith("qwen3") else QWEN25_05B
    cfg = {
        **published,
        "vocab_size": vocab_of(data_dir),
        "hidden_size": shape.n_embd,
        "num_hidden_layers": shape.n_layer,
        "max_window_layers": shape.n_layer,
        "num_attention_heads": shape.n_head,
        "num_key_value_heads": shape.n_kv_head,
        "intermediate_size": shape.mlp_hidden,
    }
    if "head_dim" in shape:
        cfg["head_dim"] = shape.head_dim
    model = _build(cfg)
    _randomize(model, seed=3)
    folder = save_folder(model.eval(), data_dir, tmp_path / "hf")
    (folder / "config.json").write_text(json.dumps(cfg))
    run_dir = tmp_path / "run"
    r = torchrun(args(data_dir, folder, run_dir, 3, f"model={preset}", "export.at_end=true"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"weights: {folder}" in r.stdout and "ZeRO stage 3" in r.stdout
    losses = [m["loss"] for m in metrics(run_dir)]
    assert len(losses) == 3 and abs(losses[0] - first_batch_loss(model, data_dir)) <= 1e-5
    exported = _transformers_model(run_dir / "hf")
    assert type(exported).__name__ == cfg["architectures"][0]
    ids = torch.randint(0, cfg["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (load_hf_folder(str(run_dir / "hf"))(ids) - exported(ids).logits).abs().max().item() <= 1e-4
    shutil.rmtree(run_dir / "checkpoints")
