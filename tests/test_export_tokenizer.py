"""What an export says about its tokenizer, and what a publisher needs.

- megagpt's own tokenizer: a pad token of its own, on an id no training step
  fed the model (a padded embedding row, else a byte UTF-8 never holds), so
  that DataCollatorForLanguageModeling keeps EOS labels and masks pads.
- A run started from a Hugging Face folder: the folder's tokenizer files,
  chat template and special-token ids come back unchanged, for tokenizers
  configured as the published Llama-2, Llama-3 and Mistral models configure
  theirs (small ones, built with the `tokenizers` library), also through real
  2-rank training runs and `python -m megagpt.export`.
- `--dtype`, the model card, no absolute local paths, gpt2's n_ctx.
- The fine-tuning snippet of docs/models.md, extracted and run as written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, make_dataset, make_texts, torchrun

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

TEXTS = ["doc 1: alpha beta gamma", "the of and omega", "ÿ, then psi"]


def own_tokenizer(vocab: int = 300):
    from megagpt.data.tokenizer import train_bpe

    return train_bpe(make_texts(120, seed=3), vocab)


def small_model(vocab_rows: int, family: str = "gpt2", max_seq_len: int = 64, **shape):
    from megagpt.model.config import GPTConfig
    from megagpt.model.gpt import GPT

    torch.manual_seed(0)
    c = GPTConfig(
        family=family, vocab_size=vocab_rows, max_seq_len=max_seq_len, n_layer=2, n_head=4, n_embd=32, **shape
    )
    return GPT(c).eval()


# -- megagpt's own tokenizer: the pad token ------------------------------------------------------


@pytest.mark.parametrize("spare_rows", [True, False], ids=["padded-embedding", "exact-embedding"])
def test_pad_is_its_own_token_and_the_collator_keeps_eos_labels(tmp_path, spare_rows):
    from megagpt.export import write_export

    tok = own_tokenizer()
    size = tok.get_vocab_size()
    model = small_model(-(-size // 64) * 64 if spare_rows else size)
    write_export(model, str(tmp_path), tok.to_str().encode())
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    eos, pad = hf_tok.eos_token_id, hf_tok.pad_token_id
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.pad_token == "<|pad|>" and pad != eos
    assert pad == (size if spare_rows else tok.token_to_id("ÿ"))  # a row past the ids, or byte 0xFF's id
    for name in ("config.json", "generation_config.json"):
        ids = json.loads((tmp_path / name).read_text())
        assert (ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"]) == (eos, eos, pad), name
    # Text encodes as megagpt's tokenizer encodes it (ÿ too, whose id the pad may have taken).
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == tok.encode(text).ids
    collator = transformers.DataCollatorForLanguageModeling(hf_tok, mlm=False)
    batch = collator([hf_tok(t + hf_tok.eos_token) for t in ("alpha beta gamma delta", "alpha")])
    ids, labels = batch["input_ids"], batch["labels"]
    is_pad = batch["attention_mask"] == 0
    assert is_pad.any() and (ids[is_pad] == pad).all() and (labels[is_pad] == -100).all()
    assert ((ids == eos) & ~is_pad).sum() == 2 and (labels[(ids == eos) & ~is_pad] == eos).all()
    # The pad's row is one the model already had: the logits are the model's.
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.tensor([tok.encode(TEXTS[0]).ids])
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() <= 1e-4


# -- a run started from a Hugging Face folder: its tokenizer kept ------------------------------

LLAMA3_CHAT = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA2_CHAT = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
    "message['content'] | trim + ' [/INST]' }}{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
MISTRAL_CHAT = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


def _added(content: str) -> dict:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }


def _sentencepiece_style(texts: list[str]):
    """Llama-2's and Mistral's layout: <unk> 0, <s> 1, </s> 2, ▁ for spaces, <s> inserted before every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


def _llama3_style(texts: list[str]):
    """Llama 3's layout: a byte-level BPE, its special tokens after the vocabulary,
    <|begin_of_text|> inserted before every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        texts, trainer=trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet, show_progress=False)
    )
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.add_special_tokens(specials)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    return tok


def published_folder(kind: str, out: Path) -> Path:
    """A small model folder whose tokenizer files and special ids are written
    as the published model's are (Llama-2-7b-chat-hf, Llama-3-8B,
    Mistral-7B-Instruct-v0.1), at a small vocabulary."""
    texts = make_texts(120, seed=4)
    tok = _llama3_style(texts) if kind == "llama3" else _sentencepiece_style(texts)
    vocab = tok.get_vocab_size()
    small = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(5)
    if kind == "llama2":
        ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**small, **ids))
        generation = {**ids, "do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_length": 4096}
        tok_config = {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": _added("<s>"),
            "chat_template": LLAMA2_CHAT,
            "clean_up_tokenization_spaces": False,
            "eos_token": _added("</s>"),
            "legacy": True,
            "model_max_length": 1000000000000000019884624838656,
            "pad_token": None,
            "padding_side": "right",
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": _added("<unk>"),
        }
        specials = {"bos_token": _added("<s>"), "eos_token": _added("</s>"), "unk_token": _added("<unk>")}
    elif kind == "llama3":
        bos, eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|end_of_text|>")
        ids = {"bos_token_id": bos, "eos_token_id": eos}
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**small, **ids, rope_theta=500000.0, tie_word_embeddings=True)
        )
        generation = {**ids, "do_sample": True, "temperature": 0.6, "top_p": 0.9}
        tok_config = {
            "bos_token": "<|begin_of_text|>",
            "chat_template": LLAMA3_CHAT,
            "clean_up_tokenization_spaces": True,
            "eos_token": "<|end_of_text|>",
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 1000000000000000019884624838656,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        specials = {"bos_token": _added("<|begin_of_text|>"), "eos_token": _added("<|end_of_text|>")}
    elif kind == "mistral":
        ids = {"bos_token_id": 1, "eos_token_id": 2}
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**small, **ids, sliding_window=None))
        generation = dict(ids)
        tok_config = {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "</s>",
            "legacy": True,
            "model_max_length": 1000000000000000019884624838656,
            "pad_token": None,
            "sp_model_kwargs": {},
            "spaces_between_special_tokens": False,
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
            "use_default_system_prompt": False,
        }
        specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        (out / "chat_template.jinja").parent.mkdir(parents=True, exist_ok=True)
        (out / "chat_template.jinja").write_text(MISTRAL_CHAT)  # the newer layout: the template in a file of its own
    else:
        raise ValueError(kind)
    model.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out


KEPT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def check_source_kept(source: Path, export: Path) -> None:
    """The export's tokenizer is the source's: the same files, ids, encodings and chat template."""
    for name in (*KEPT_FILES, "generation_config.json"):
        if (source / name).exists():
            assert (export / name).read_bytes() == (source / name).read_bytes(), name
    theirs, ours = (json.loads((p / "config.json").read_text()) for p in (source, export))
    for key, value in theirs.items():  # every field of the source's config.json, pad_token_id included
        if key not in ("_name_or_path", "dtype", "torch_dtype"):
            assert ours.get(key) == value, (key, ours.get(key), value)
    src_tok, exp_tok = (transformers.AutoTokenizer.from_pretrained(p) for p in (source, export))
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(exp_tok, f"{name}_token_id") == getattr(src_tok, f"{name}_token_id"), name
    assert exp_tok.bos_token_id == theirs["bos_token_id"] and exp_tok.eos_token_id == theirs["eos_token_id"]
    for text in TEXTS:
        assert exp_tok(text) == src_tok(text)
    chat = [{"role": "user", "content": "alpha beta"}, {"role": "assistant", "content": "gamma"}]
    rendered = exp_tok.apply_chat_template(chat, tokenize=False)
    assert rendered == src_tok.apply_chat_template(chat, tokenize=False) and "gamma" in rendered


@pytest.mark.parametrize("kind", ["llama2", "llama3", "mistral"])
def test_the_source_folders_tokenizer_comes_back_unchanged(tmp_path, kind):
    """A model read from a published-style folder and exported with that
    folder's files (as a checkpoint carries them)."""
    from megagpt.export import write_export
    from megagpt.hf import load_hf_folder
    from megagpt.hf.tokenizer_files import read_source_files

    source = published_folder(kind, tmp_path / "source")
    model = load_hf_folder(str(source))
    model.cfg = dataclasses.replace(model.cfg, init_from=str(source))
    data_tokenizer = (source / "tokenizer.json").read_bytes()
    out = tmp_path / "export"
    write_export(model, str(out), data_tokenizer, source=read_source_files(str(source)), name="cont")
    check_source_kept(source, out)
    config = json.loads((out / "config.json").read_text())
    assert config["megagpt"]["init_from"] == "source"  # the folder's name, not its path
    assert str(tmp_path) not in (out / "config.json").read_text() + (out / "README.md").read_text()
    assert "continued from `source`" in (out / "README.md").read_text()


# -- publishing: dtype, the model card, paths, gpt2's fields -------------------------------------


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_dtype_writes_the_weights_and_says_so(tmp_path, dtype):
    from safetensors.torch import load_file

    from megagpt.export import DTYPES, write_export

    tok = own_tokenizer()
    model = small_model(320, "llama", tie_embeddings=False)
    write_export(model, str(tmp_path), tok.to_str().encode(), dtype=dtype)
    torch_dtype, name = DTYPES[dtype]
    tensors = load_file(tmp_path / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch_dtype}
    assert torch.equal(tensors["lm_head.weight"], model.lm_head.weight.detach().to(torch_dtype))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == name
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto").eval()
    assert hf.dtype == torch_dtype
    x = torch.tensor([tok.encode(TEXTS[0]).ids])
    with torch.no_grad():
        assert (hf(x).logits.float() - model(x)).abs().max().item() <= 0.05
    assert f"| weights | {name} (safetensors) |" in (tmp_path / "README.md").read_text()


def test_gpt2_config_keeps_the_fields_downstream_tools_read(tmp_path):
    from megagpt.export import write_export

    write_export(small_model(320, max_seq_len=48), str(tmp_path), own_tokenizer().to_str().encode())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["n_ctx"] == config["n_positions"] == 48  # llama.cpp's converter reads n_ctx
    for key in ("n_embd", "n_layer", "n_head", "n_inner", "layer_norm_epsilon", "vocab_size"):
        assert key in config, key


def test_model_card_says_what_the_model_is_without_local_paths(tmp_path):
    """The card from a run's record: a mixture with local and remote sources,
    a continued pretraining's source, paths inside and outside the run."""
    from omegaconf import OmegaConf
    from test_config import make_cfg

    from megagpt.hf.model_card import model_card

    run_dir = tmp_path / "runs" / "mine"
    cfg = OmegaConf.to_container(OmegaConf.structured(make_cfg(f"run.dir={run_dir}")))
    cfg["data"]["source"] = "mixture"
    cfg["data"]["sources"] = [
        {"name": "web", "urls": str(tmp_path / "corpora" / "fineweb"), "weight": 3.0, "manifest": None},
        {"name": "code", "urls": ["https://example.org/code-{0..9}.tar", str(run_dir / "extra")], "weight": 1.0},
    ]
    state = {
        "step": 30,
        "tokens_seen": 122880,
        "world_size": 2,
        "precision": "bf16",
        "config": cfg,
        "init_from": {"path": str(tmp_path / "models" / "Llama-3.2-1B"), "architectures": ["LlamaForCausalLM"]},
    }
    model = small_model(320, "llama", tie_embeddings=False)
    card = model_card(
        model.cfg, "LlamaForCausalLM", 12345, "bfloat16", "the source model's", "mine", state, str(run_dir)
    )
    assert str(tmp_path) not in card
    for part in (
        "# mine",
        "continued from `Llama-3.2-1B`",
        "| architecture | `LlamaForCausalLM` (megagpt family `llama`) |",
        "| parameters | 12,345 (0.01 M) |",
        "| tokens seen | 122,880 |",
        "| steps | 30 |",
        "`web`: `fineweb` (weight 3.0, 75% of the sequences)",
        "`code`: `https://example.org/code-{0..9}.tar`, `extra` (weight 1.0, 25% of the sequences)",
        "## Tokenizer\n\nthe source model's.",
        "## Training config",
        "  dir: .\n",  # run.dir, relative to the run
        "| weights | bfloat16 (safetensors) |",
    ):
        assert part in card, part


# -- the fine-tuning snippet of docs/models.md -----------------------------------------------------


def fine_tuning_snippet() -> str:
    text = (REPO / "docs" / "models.md").read_text()
    section = text[text.index("## Fine-tuning") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_docs_fine_tuning_snippet_runs_as_written(tmp_path):
    """The snippet on an export of the default model's context (128 positions),
    with texts longer than that: the length comes from the model's config."""
    from megagpt.export import write_export

    tok = own_tokenizer()
    export = tmp_path / "myrun-hf"
    write_export(small_model(tok.get_vocab_size(), max_seq_len=128), str(export), tok.to_str().encode())
    snippet = fine_tuning_snippet()
    assert snippet.count('"outputs/myrun-hf"') == 2 and "max_steps=1000" in snippet
    code = (
        snippet.replace('"outputs/myrun-hf"', repr(str(export)))
        .replace('"outputs/ft"', repr(str(tmp_path / "ft")))
        .replace("max_steps=1000", "max_steps=3")
    )
    long_texts = make_texts(16, seed=9, min_words=150, max_words=200)
    assert len(tok.encode(long_texts[0]).ids) > 128
    cwd = os.getcwd()
    os.chdir(tmp_path)  # whatever the Trainer writes beside its output dir
    try:
        exec(compile(code, "docs/models.md#fine-tuning", "exec"), {"my_texts": long_texts})
    finally:
        os.chdir(cwd)


# -- through real runs and the command line --------------------------------------------------------


def _args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"run.dir={run_dir}",
        "data=webdataset",
        f"data.urls={data}",
        "data.seq_len=32",
        "trainer.micro_batch_size=4",
        "trainer.max_steps=2",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "optim.warmup_steps=1",
        "logger=none",
        "trainer.peak_flops=1e11",
        *extra,
    ]


def _export(run_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megagpt.export", "--checkpoint", str(run_dir), "--out", str(out), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _no_local_paths(folder: Path, *paths: Path) -> None:
    for name in ("megagpt_export.json", "config.json", "README.md"):
        text = (folder / name).read_text()
        for path in paths:
            assert str(path) not in text, (name, str(path))


@pytest.mark.slow  # a real 2-rank run per source and an export
@pytest.mark.parametrize("kind", ["llama2", "llama3", "mistral"])
def test_continued_pretraining_exports_the_source_tokenizer(tmp_path, kind):
    """model.init_from a published-style folder, 2 steps under 2-rank ZeRO-3,
    the folder removed, then `python -m megagpt.export`: the export's tokenizer
    and ids are the folder's; only the weights (and megagpt's record) changed."""
    source = published_folder(kind, tmp_path / "source")
    keep = tmp_path / "source-copy"
    subprocess.run(["cp", "-r", str(source), str(keep)], check=True)
    src = tmp_path / "src"
    src.mkdir()
    for i, text in enumerate(make_texts(80, seed=6)):
        (src / f"{i}.txt").write_text(text)
    prep = subprocess.run(
        [sys.executable, "-m", "megagpt.data.prepare", "--input", str(src), "--output", str(tmp_path / "data")]
        + ["--tokenizer", str(source), "--docs-per-shard", "8"],
        capture_output=True,
        text=True,
    )
    assert prep.returncode == 0, prep.stderr[-2000:]
    run_dir = tmp_path / "run"
    r = torchrun(_args(tmp_path / "data", run_dir, f"model.init_from={source}"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    subprocess.run(["rm", "-r", str(source)], check=True)  # the folder may be gone by export time
    out = tmp_path / "hf"
    _export(run_dir, out, "--name", "my-continued-model")
    check_source_kept(keep, out)
    card = (out / "README.md").read_text()
    assert "# my-continued-model" in card and "continued from `source`" in card and "tokens seen" in card
    record = json.loads((out / "megagpt_export.json").read_text())
    assert record["checkpoint"] == "checkpoints/step_2" and record["step"] == 2
    _no_local_paths(out, tmp_path)


@pytest.mark.slow  # a real 2-rank run and two exports
def test_scratch_run_export_from_the_command_line(tmp_path):
    """A run on megagpt's own tokenizer, exported in bf16: a pad token of its
    own, the model card with the data as configured, no local paths."""
    data = make_dataset(tmp_path, n_docs=60, docs_per_shard=6)
    run_dir = tmp_path / "run"
    r = torchrun(_args(data, run_dir, "model=tiny", "model.n_layer=2", "model.n_embd=64"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "hf"
    _export(run_dir, out, "--dtype", "bf16")
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["n_ctx"] == 32
    assert config["pad_token_id"] not in (None, config["eos_token_id"])
    card = (out / "README.md").read_text()
    assert "# run" in card and "`data` (`data.source=webdataset`)" in card and "| steps | 2 |" in card
    assert "| weights | bfloat16 (safetensors) |" in card and "data.seq_len" not in card
    record = json.loads((out / "megagpt_export.json").read_text())
    assert record == {
        "checkpoint": "checkpoints/step_2",
        "name": "run",
        "step": 2,
        "tokens_seen": record["tokens_seen"],
        "dtype": "bf16",
    }
    _no_local_paths(out, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert hf.dtype == torch.bfloat16
