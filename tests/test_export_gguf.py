"""GGUF for llama.cpp and Ollama (megagpt/export_gguf.py): exports made by
megagpt.export's write_export from real megagpt models are written as GGUF
and read back with llama.cpp's own `gguf` package: every tensor against the
export's (exact in f32; GPT-2's transposition and llama's q/k row order
undone), the tokenizer's vocabulary, merges and special ids, the metadata.
Where llama-cpp-python is installed, llama.cpp itself generates greedily the
same tokens as megagpt.generate."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from helpers import make_texts

gguf = pytest.importorskip("gguf")

from megagpt.data.tokenizer import eod_id, train_bpe  # noqa: E402
from megagpt.export import write_export  # noqa: E402
from megagpt.export_gguf import GGUFError, main, write_gguf  # noqa: E402
from megagpt.model.config import GPTConfig  # noqa: E402
from megagpt.model.gpt import GPT  # noqa: E402
from megagpt.model.layers import apply_rope, rope_tables  # noqa: E402

MODELS = {
    # tied head, biases, learned positions
    "gpt2": dict(family="gpt2", n_layer=2, n_head=4, n_embd=64),
    # untied head, 4 query heads on 2 key/value heads, no biases, Llama 3.1's rope scaling
    "llama": dict(
        family="llama",
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=64,
        mlp_hidden=160,
        bias=False,
        tie_embeddings=False,
        rope_theta=500000.0,
        rope_scaling="llama3",
        rope_scaling_factor=8.0,
        rope_scaling_low_freq_factor=1.0,
        rope_scaling_high_freq_factor=4.0,
        rope_scaling_original_max_seq_len=32,
    ),
    # llama's computation exported as MistralForCausalLM; tied head
    "mistral": dict(family="mistral", n_layer=1, n_head=4, n_kv_head=1, n_embd=64, mlp_hidden=96, bias=False),
    # biases on q/k/v only; untied head
    "qwen2": dict(
        family="qwen2",
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=64,
        mlp_hidden=128,
        bias=False,
        tie_embeddings=False,
        rope_theta=1e6,
        norm_eps=1e-6,
    ),
    # q_norm / k_norm, heads of 32 at width 64 (4 x 32 = 2 x the width, as in Qwen3-0.6B), tied head
    "qwen3": dict(
        family="qwen3",
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=64,
        head_dim=32,
        mlp_hidden=128,
        bias=False,
        rope_theta=1e6,
        norm_eps=1e-6,
    ),
}
ARCH = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
INTERLEAVED = ("llama", "mistral")  # llama.cpp's arch llama: q/k rows reordered
SEQ = 64


def model_of(family: str, tok, texts=None) -> GPT:
    """A small model; trained for a few seconds on `texts` where given, so that
    its greedy choices are clear (a random model's logits nearly tie)."""
    cfg = GPTConfig(vocab_size=448, max_seq_len=SEQ, eod_id=eod_id(tok), **MODELS[family])
    model = GPT(cfg)
    model.init_weights(0)
    if texts is None:
        return model.eval()
    ids = [i for t in texts for i in tok.encode(t).ids + [eod_id(tok)]]
    data = torch.tensor(ids[: (len(ids) // SEQ) * SEQ]).view(-1, SEQ)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        batch = data[torch.randint(0, len(data), (8,), generator=gen)]
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _exports(root, train: bool) -> dict:
    texts = make_texts(300, seed=1)
    tok = train_bpe(texts, 400)
    out = {}
    for family in MODELS:
        model = model_of(family, tok, texts if train else None)
        folder = str(root / family)
        write_export(model, folder, tok.to_str().encode())
        out[family] = (folder, model)
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """family -> (export folder, the model): write_export, as megagpt.export writes a run's."""
    return _exports(tmp_path_factory.mktemp("gguf"), train=False)


@pytest.fixture(scope="module")
def trained_exports(tmp_path_factory):
    """As `exports`, of briefly trained models."""
    return _exports(tmp_path_factory.mktemp("gguf-trained"), train=True)


def tensors_of(path: str) -> dict[str, object]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def field(reader, key):
    return reader.fields[key].contents()


def export_tensors(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def undo_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's adjacent pairs (2i, 2i + 1) back to Hugging Face's halves (i, i + d/2)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str, family: str) -> str:
    """The export's tensor name for a GGUF tensor name (written here, independently of the writer)."""
    if family == "gpt2":
        table = {
            "token_embd": "transformer.wte",
            "position_embd": "transformer.wpe",
            "output_norm": "transformer.ln_f",
            "attn_norm": "ln_1",
            "attn_qkv": "attn.c_attn",
            "attn_output": "attn.c_proj",
            "ffn_norm": "ln_2",
            "ffn_up": "mlp.c_fc",
            "ffn_down": "mlp.c_proj",
        }
        block = "transformer.h"
    else:
        table = {
            "token_embd": "model.embed_tokens",
            "output_norm": "model.norm",
            "output": "lm_head",
            "attn_norm": "input_layernorm",
            "attn_q": "self_attn.q_proj",
            "attn_q_norm": "self_attn.q_norm",
            "attn_k_norm": "self_attn.k_norm",
            "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj",
            "ffn_norm": "post_attention_layernorm",
            "ffn_gate": "mlp.gate_proj",
            "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj",
        }
        block = "model.layers"
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"{block}.{parts[1]}.{table[parts[2]]}.{parts[3]}"
    return f"{table[parts[0]]}.{parts[1]}"


@pytest.mark.parametrize("family", list(MODELS))
def test_every_tensor_equals_the_exports_in_f32(exports, family, tmp_path):
    folder, model = exports[family]
    path = write_gguf(folder, str(tmp_path / "m.gguf"))
    ours = export_tensors(folder)
    theirs = tensors_of(path)
    c = model.cfg
    rope_freqs = theirs.pop("rope_freqs.weight", None)
    assert {hf_name(n, family) for n in theirs} == set(ours)  # every tensor, nothing else
    assert ("output.weight" in theirs) == (not c.tie_embeddings)
    for name, t in theirs.items():
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        expected = ours[hf_name(name, family)].numpy()
        got = np.array(t.data)
        if family == "gpt2" and name.endswith(
            ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")
        ):
            expected = expected.T  # Conv1D (in, out) -> llama.cpp's (out, in)
        if family in INTERLEAVED and name.endswith(("attn_q.weight", "attn_q.bias")):
            got = undo_rope_rows(got, c.n_head)
        if family in INTERLEAVED and name.endswith(("attn_k.weight", "attn_k.bias")):
            got = undo_rope_rows(got, c.n_kv_head)
        assert got.shape == expected.shape, name
        assert np.array_equal(got, expected), name
    if family == "llama":  # Llama 3.1's scaling: llama.cpp divides each base frequency by its factor
        wavelen = 2 * np.pi * c.rope_theta ** (np.arange(0, c.head_dim, 2) / c.head_dim)
        factors = np.array(rope_freqs.data)
        long, short = wavelen > 32 / 1.0, wavelen < 32 / 4.0  # original_max_seq_len / low, high freq factor
        assert long.any() and short.any()
        assert np.allclose(factors[long], 8.0) and np.allclose(factors[short], 1.0)
    else:
        assert rope_freqs is None


def adjacent_pair_rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's rope for arch llama (GGML_ROPE_TYPE_NORM): dims (2i, 2i + 1)
    rotated by pos * theta^(-2i / d).  x: (T, heads, d)."""
    d = x.shape[-1]
    freq = pos[:, None].float() * theta ** (-torch.arange(0, d, 2).float() / d)  # (T, d / 2)
    cos, sin = freq.cos()[:, None, :], freq.sin()[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def test_llama_q_k_rows_give_llama_cpp_the_same_attention_scores(exports, tmp_path):
    """The reordered q/k rows under llama.cpp's adjacent-pair rope score
    query/key pairs as the export's rows do under Hugging Face's rotate-half."""
    folder, model = exports["mistral"]  # no rope scaling: llama.cpp's plain formula
    c = model.cfg
    path = write_gguf(folder, str(tmp_path / "m.gguf"))
    g = tensors_of(path)
    hf = export_tensors(folder)
    x = torch.randn(10, c.n_embd, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(10)
    d = c.head_dim

    def heads(w, n):
        return (x @ w.T).view(10, n, d)

    q_hf = heads(hf["model.layers.0.self_attn.q_proj.weight"], c.n_head)
    k_hf = heads(hf["model.layers.0.self_attn.k_proj.weight"], c.n_kv_head)
    cos, sin = rope_tables(pos, d, c.rope_theta)
    q_hf = apply_rope(q_hf.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)
    k_hf = apply_rope(k_hf.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)
    q_cpp = adjacent_pair_rope(
        heads(torch.tensor(np.array(g["blk.0.attn_q.weight"].data)), c.n_head), pos, c.rope_theta
    )
    k_cpp = adjacent_pair_rope(
        heads(torch.tensor(np.array(g["blk.0.attn_k.weight"].data)), c.n_kv_head), pos, c.rope_theta
    )
    group = c.n_head // c.n_kv_head
    scores_hf = torch.einsum("qhd,khd->hqk", q_hf, k_hf.repeat_interleave(group, dim=1))
    scores_cpp = torch.einsum("qhd,khd->hqk", q_cpp, k_cpp.repeat_interleave(group, dim=1))
    assert torch.allclose(scores_hf, scores_cpp, atol=1e-5, rtol=1e-5)
    # and the plain rows would not: the reordering is needed
    q_plain = adjacent_pair_rope(heads(hf["model.layers.0.self_attn.q_proj.weight"], c.n_head), pos, c.rope_theta)
    k_plain = adjacent_pair_rope(heads(hf["model.layers.0.self_attn.k_proj.weight"], c.n_kv_head), pos, c.rope_theta)
    scores_plain = torch.einsum("qhd,khd->hqk", q_plain, k_plain.repeat_interleave(group, dim=1))
    assert not torch.allclose(scores_hf, scores_plain, atol=1e-3)


@pytest.mark.parametrize("family", list(MODELS))
def test_metadata(exports, family, tmp_path):
    folder, model = exports[family]
    c = model.cfg
    r = gguf.GGUFReader(write_gguf(folder, str(tmp_path / "m.gguf")))
    arch = ARCH[family]
    assert field(r, "general.architecture") == arch
    assert field(r, f"{arch}.context_length") == SEQ
    assert field(r, f"{arch}.embedding_length") == c.n_embd
    assert field(r, f"{arch}.block_count") == c.n_layer
    assert field(r, f"{arch}.feed_forward_length") == c.mlp_hidden
    assert field(r, f"{arch}.attention.head_count") == c.n_head
    assert field(r, f"{arch}.attention.head_count_kv") == c.n_kv_head
    assert field(r, "general.file_type") == gguf.LlamaFileType.ALL_F32
    if family == "gpt2":
        assert field(r, "gpt2.attention.layer_norm_epsilon") == pytest.approx(c.norm_eps)
        assert "gpt2.rope.freq_base" not in r.fields
    else:
        assert field(r, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(c.norm_eps)
        assert field(r, f"{arch}.rope.freq_base") == c.rope_theta
        assert field(r, f"{arch}.rope.dimension_count") == c.head_dim
        assert field(r, f"{arch}.attention.key_length") == field(r, f"{arch}.attention.value_length") == c.head_dim


def test_tokenizer_vocabulary_merges_and_special_ids(exports, tmp_path):
    folder, model = exports["gpt2"]
    r = gguf.GGUFReader(write_gguf(folder, str(tmp_path / "m.gguf")))
    with open(os.path.join(folder, "tokenizer.json")) as f:
        spec = json.load(f)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    tokens = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == model.cfg.vocab_size  # the embedding's rows
    n = tok.get_vocab_size()
    assert tokens[:n] == [tok.id_to_token(i) for i in range(n)]
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, model.cfg.vocab_size)]
    assert types[n:] == [gguf.TokenType.UNUSED] * (model.cfg.vocab_size - n)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert field(r, "tokenizer.ggml.merges") == merges and len(merges) > 100
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.pre") == "gpt-2"
    eod = tok.token_to_id("<|endoftext|>")
    assert field(r, "tokenizer.ggml.eos_token_id") == config["eos_token_id"] == eod
    assert field(r, "tokenizer.ggml.bos_token_id") == config["bos_token_id"]
    assert field(r, "tokenizer.ggml.padding_token_id") == config["pad_token_id"]
    assert field(r, "tokenizer.ggml.add_bos_token") is False
    for added in spec["added_tokens"]:  # the special tokens are control tokens, the rest normal
        assert types[added["id"]] == gguf.TokenType.CONTROL
    specials = {a["id"] for a in spec["added_tokens"]}
    assert all(types[i] == gguf.TokenType.NORMAL for i in range(n) if i not in specials)


@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0"])
def test_reduced_types_round_to_the_exports(exports, kind, tmp_path):
    folder, model = exports["llama"]
    path = write_gguf(folder, str(tmp_path / f"m-{kind}.gguf"), kind)
    ours = export_tensors(folder)
    want = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[kind]
    r = gguf.GGUFReader(path)
    assert field(r, "general.file_type") == {"f16": 1, "bf16": 32, "q8_0": 7}[kind]
    for t in r.tensors:
        if t.name == "rope_freqs.weight":
            continue
        expected = ours[hf_name(t.name, "llama")].numpy()
        got = gguf.quants.dequantize(np.array(t.data), t.tensor_type)
        if t.name.endswith(("attn_q.weight",)):
            got = undo_rope_rows(got, model.cfg.n_head)
        if t.name.endswith(("attn_k.weight",)):
            got = undo_rope_rows(got, model.cfg.n_kv_head)
        if expected.ndim == 1:  # norms stay f32, exactly
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(got, expected), t.name
            continue
        assert t.tensor_type.name == want, t.name
        assert got.shape == expected.shape
        # q8_0: one scale per 32 values, the largest / 127; f16 and bf16: relative rounding
        step = {"f16": 2**-10, "bf16": 2**-7, "q8_0": 1 / 127}[kind]
        assert np.abs(got - expected).max() <= step * np.abs(expected).max(), t.name
        assert not np.array_equal(got, expected)


def test_q8_0_keeps_rows_that_are_not_whole_blocks_in_f16(exports, tmp_path):
    folder, _ = exports["mistral"]  # mlp_hidden 96: ffn_down rows of 96 (3 blocks); embedding rows of 64
    r = tensors_of(write_gguf(folder, str(tmp_path / "m.gguf"), "q8_0"))
    assert r["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    odd = tmp_path / "odd"
    texts = make_texts(50, seed=2)
    tok = train_bpe(texts, 300)
    model = GPT(
        GPTConfig(vocab_size=320, max_seq_len=16, family="llama", n_layer=1, n_head=2, n_embd=48, mlp_hidden=80)
    )
    model.init_weights(0)
    write_export(model, str(odd), tok.to_str().encode())
    r = tensors_of(write_gguf(str(odd), str(tmp_path / "odd.gguf"), "q8_0"))
    assert r["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16  # rows of 80
    assert r["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16  # rows of 48
    assert r["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.F16


def split_style(folder: str, dest, regex: str, ignore_merges: bool, nfc: bool = False, bos: bool = False) -> str:
    """A copy of the export whose tokenizer splits text as Llama 3's and Qwen's
    do (a Split by `regex`, then ByteLevel without a regex of its own), with
    Qwen's NFC normalizer where `nfc`, adding <|begin_of_text|> before the text
    where `bos` (Llama 3's post-processor)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(make_texts(200, seed=3), trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
        )
    shutil.copytree(folder, dest)
    tok.save(os.path.join(dest, "tokenizer.json"))
    with open(os.path.join(dest, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "chat_template": "{{ x }}"}, f)
    return str(dest)


def test_llama3_style_tokenizer_is_llama_bpe_with_bos(exports, tmp_path):
    from megagpt.export_gguf import LLAMA3_SPLIT

    folder = split_style(exports["llama"][0], tmp_path / "l3", LLAMA3_SPLIT, ignore_merges=True, bos=True)
    r = gguf.GGUFReader(write_gguf(folder, str(tmp_path / "m.gguf")))
    assert field(r, "tokenizer.ggml.pre") == "llama-bpe"
    assert field(r, "tokenizer.ggml.bos_token_id") == 0
    assert field(r, "tokenizer.ggml.eos_token_id") == 1
    assert field(r, "tokenizer.ggml.add_bos_token") is True
    assert field(r, "tokenizer.ggml.add_eos_token") is False
    assert field(r, "tokenizer.chat_template") == "{{ x }}"
    # Llama 3's split with a normalizer llama.cpp does not apply: refused
    nfc = split_style(exports["llama"][0], tmp_path / "l3nfc", LLAMA3_SPLIT, ignore_merges=True, nfc=True)
    with pytest.raises(GGUFError, match="the normalizer NFC has no llama.cpp equivalent"):
        write_gguf(nfc, str(tmp_path / "nfc.gguf"))


def test_qwen_style_tokenizer_is_qwen2_and_its_nfc_is_noted(exports, tmp_path, capsys):
    from megagpt.export_gguf import QWEN2_SPLIT

    folder = split_style(exports["qwen2"][0], tmp_path / "q", QWEN2_SPLIT, ignore_merges=False, nfc=True)
    r = gguf.GGUFReader(write_gguf(folder, str(tmp_path / "m.gguf")))
    assert field(r, "tokenizer.ggml.pre") == "qwen2"
    assert field(r, "tokenizer.ggml.add_bos_token") is False
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "llama.cpp does not apply the tokenizer's NFC normalizer" in err, err


def _edit_tokenizer(folder: str, dest, edit) -> str:
    shutil.copytree(folder, dest)
    path = os.path.join(dest, "tokenizer.json")
    with open(path) as f:
        spec = json.load(f)
    edit(spec)
    with open(path, "w") as f:
        json.dump(spec, f)
    return str(dest)


def _sentencepiece_style(spec):
    spec["model"]["byte_fallback"] = True
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}


def _prefix_space(spec):
    spec["pre_tokenizer"]["add_prefix_space"] = True


def _other_regex(spec):
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"\p{N}{1,2}|\p{L}+"}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }


def _normalizer(spec):
    spec["normalizer"] = {"type": "NFC"}


def _merges_ignored(spec):
    spec["model"]["ignore_merges"] = True


@pytest.mark.parametrize(
    "edit, says",
    [
        (_sentencepiece_style, "byte_fallback"),
        (_prefix_space, "matches no llama.cpp pre-tokenizer"),
        (_other_regex, r"Split by '\\p{N}{1,2}|\\p{L}+'"),
        (_normalizer, "normalizer NFC"),
        (_merges_ignored, "ignore_merges True differs from llama.cpp's 'gpt-2'"),
    ],
)
def test_a_tokenizer_llama_cpp_would_split_otherwise_is_refused_in_one_line(exports, edit, says, tmp_path, capsys):
    folder = _edit_tokenizer(exports["gpt2"][0], tmp_path / "bad", edit)
    target = tmp_path / "m.gguf"
    assert main(["--model", folder, "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("megagpt.export_gguf: error: "), err
    assert "tokenizer.json" in err and says in err, err
    assert "Traceback" not in err
    assert not target.exists() and not list(tmp_path.glob("m.gguf*"))


def test_bad_targets_and_folders_are_one_line_errors(exports, tmp_path, capsys):
    folder = exports["gpt2"][0]
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    cases = [
        (["--model", folder, "--out", str(other)], "exists and is not a GGUF file"),
        (["--model", folder, "--out", str(tmp_path)], "is a folder"),
        (["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.gguf")], "config.json: no such file"),
    ]
    for argv, says in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    assert other.read_text() == "mine"
    # an earlier GGUF is replaced, and --overwrite replaces anything
    target = tmp_path / "m.gguf"
    assert main(["--model", folder, "--out", str(target)]) == 0
    assert main(["--model", folder, "--out", str(target), "--type", "q8_0"]) == 0
    assert field(gguf.GGUFReader(str(target)), "general.file_type") == 7
    assert main(["--model", folder, "--out", str(other), "--overwrite"]) == 0
    assert other.read_bytes()[:4] == b"GGUF"


def test_a_family_without_a_writer_and_a_missing_tensor_are_refused(exports, tmp_path):
    from safetensors.torch import load_file, save_file

    dest = tmp_path / "cut"
    shutil.copytree(exports["llama"][0], dest)
    sd = load_file(str(dest / "model.safetensors"))
    sd.pop("model.layers.1.mlp.up_proj.weight")
    save_file(sd, str(dest / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(GGUFError, match="lack 1 tensors .*model.layers.1.mlp.up_proj.weight"):
        write_gguf(str(dest), str(tmp_path / "m.gguf"))


# -- llama.cpp itself --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
@pytest.mark.parametrize("family", list(MODELS))
def test_llama_cpp_generates_megagpt_s_greedy_tokens(request, family, kind, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")  # source-only on PyPI: not in the dev extras (docs/models.md)
    from megagpt.data.tokenizer import load_tokenizer
    from megagpt.generate import generate

    folder, model = request.getfixturevalue("trained_exports")[family]
    path = write_gguf(folder, str(tmp_path / f"m-{kind}.gguf"), kind)
    tok = load_tokenizer(folder)
    prompt = "doc 7: alpha beta gamma the"
    ids = tok.encode(prompt).ids
    llm = llama_cpp.Llama(path, n_ctx=SEQ, n_threads=2, verbose=False, logits_all=True)
    # the logits of a text, position by position (llama.cpp keeps its key/value cache in f16)
    text = tok.encode(make_texts(1, seed=9)[0]).ids[:40]
    llm.eval(text)
    with torch.no_grad():
        expected = model(torch.tensor([text]))[0].numpy()
    assert np.abs(np.array(llm.scores[: len(text)]) - expected).max() <= {"f32": 5e-3, "q8_0": 0.15}[kind]
    llm.reset()
    assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids  # the same pre-tokenizer
    # whitespace runs, newlines, tabs, digits, contractions, bytes the tokenizer never merged
    odd = "  alpha\n\n  beta\t gamma's 12345   x\r\n café — ok?!  "
    assert llm.tokenize(odd.encode(), add_bos=False, special=False) == tok.encode(odd).ids
    ours = generate(model, ids, 24, stop=eod_id(tok))
    theirs = []
    for t in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        theirs.append(t)
        if len(theirs) == 24 or t == llm.token_eos():
            break
    assert theirs == ours
    assert llm.detokenize(theirs).decode() == tok.decode(ours)


def test_a_bf16_export_is_written_exactly(exports, tmp_path):
    _, model = exports["llama"]
    folder = tmp_path / "bf16"
    write_export(
        model, str(folder), open(os.path.join(exports["llama"][0], "tokenizer.json"), "rb").read(), dtype="bf16"
    )
    ours = export_tensors(str(folder))
    assert ours["model.embed_tokens.weight"].dtype == torch.bfloat16
    for kind, want in (("f32", gguf.GGMLQuantizationType.F32), ("bf16", gguf.GGMLQuantizationType.BF16)):
        r = tensors_of(write_gguf(str(folder), str(tmp_path / f"m-{kind}.gguf"), kind))
        t = r["blk.1.ffn_up.weight"]
        assert t.tensor_type == want
        got = gguf.quants.dequantize(np.array(t.data), t.tensor_type)
        assert np.array_equal(got, ours["model.layers.1.mlp.up_proj.weight"].float().numpy())


# -- the command line, from a real training run ------------------------------------------------


@pytest.mark.slow
def test_export_cli_writes_the_gguf_of_a_trained_run(tmp_path):
    """`python -m megagpt.export --gguf`: a real 2-process run, exported
    in shards and as q8_0 GGUF; a target it may not write stops it before the export."""
    import subprocess
    import sys

    from helpers import make_dataset, torchrun

    data = make_dataset(tmp_path, n_docs=80, docs_per_shard=8)
    run = tmp_path / "run"
    r = torchrun(
        [
            f"run.dir={run}",
            "data=webdataset",
            f"data.urls={data}",
            "data.seq_len=32",
            "model=llama-tiny",
            "model.n_layer=2",
            "model.n_embd=64",
            "model.n_head=4",
            "model.n_kv_head=2",
            "model.mlp_hidden=160",
            "trainer.micro_batch_size=4",
            "trainer.max_steps=6",
            "trainer.save_every=6",
            "trainer.log_every=3",
            "optim.warmup_steps=2",
            "logger=none",
            "trainer.peak_flops=1e11",
        ],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]

    def export(*extra):
        cmd = [sys.executable, "-m", "megagpt.export", "--checkpoint", str(run), "--out", str(tmp_path / "hf"), *extra]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)

    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    bad = export("--gguf", str(blocker))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "exists and is not a GGUF file" in bad.stderr and not (tmp_path / "hf").exists()

    target = tmp_path / "model.gguf"
    ok = export("--gguf", str(target), "--gguf-type", "q8_0", "--max-shard-bytes", "100000")
    assert ok.returncode == 0, ok.stderr
    assert f"and {target} (q8_0)" in ok.stdout
    hf = tmp_path / "hf"
    assert (hf / "model.safetensors.index.json").is_file()  # read from shards
    from megagpt.hf import load_hf_folder

    model = load_hf_folder(str(hf))
    r = gguf.GGUFReader(str(target))
    assert field(r, "general.architecture") == "llama" and field(r, "general.file_type") == 7
    embd = {t.name: t for t in r.tensors}["token_embd.weight"]
    got = gguf.quants.dequantize(np.array(embd.data), embd.tensor_type)
    expected = model.wte.weight.detach().numpy()
    assert np.abs(got - expected).max() <= np.abs(expected).max() / 127
    assert len(r.tensors) == 3 + 9 * 2  # embedding, final norm, untied head; 9 per block
