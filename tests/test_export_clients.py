"""Exports as the clients read them, on the oldest and the newest transformers
megagpt allows (pyproject.toml: transformers>=4.45,<6): the tokenizer's
outputs, the logits of `model(**tok(text))` and the greedy tokens of
`generate(**tok(text))` equal megagpt's own, for a gpt2 and a llama export.

The venv's transformers (5.x) runs in-process; 4.45.0 runs in a subprocess
with its own transformers, tokenizers and huggingface_hub, installed once
with `pip install --target` into ~/.cache/megagpt-tests/ (the venv's torch and
the rest through the normal site-packages, the target first on PYTHONPATH);
without pip or the package index the 4.x half is skipped with the reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, make_texts

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

# The oldest transformers pyproject.toml allows, with a tokenizers and huggingface_hub it accepts.
OLDEST = ("transformers==4.45.0", "tokenizers==0.20.3", "huggingface_hub==0.25.2")
CACHE = Path(os.environ.get("MEGAGPT_TEST_CACHE", Path.home() / ".cache" / "megagpt-tests"))
TEXTS = ["doc 7: alpha beta gamma", "the of and omega psi", "ÿ and ÿ, then chi phi"]  # ÿ: byte 0xFF's symbol


@pytest.fixture(scope="session")
def transformers_4() -> Path:
    """A folder holding transformers 4.45.0 (and its tokenizers and
    huggingface_hub), for PYTHONPATH; installed on first use, then cached."""
    target = CACHE / "-".join(p.replace("==", "-") for p in OLDEST)
    if (target / ".complete").is_file():
        return target
    partial = Path(f"{target}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(partial), *OLDEST],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        reason = (r.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"cannot install {' '.join(OLDEST)} with pip: {reason}")
    size = sum(p.stat().st_size for p in partial.rglob("*") if p.is_file())
    (partial / ".complete").write_text(f"installed in {time.monotonic() - t0:.1f} s, {size / 1e6:.0f} MB\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return target


def run_client(site: Path, folders: dict[Path, list[str]]) -> dict[str, dict]:
    """hf_client.report for each folder, under the transformers installed in `site`: {folder: report}."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    asked = json.dumps({str(folder): texts for folder, texts in folders.items()})
    r = subprocess.run(
        [sys.executable, str(REPO / "tests" / "hf_client.py"), asked],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def tokenizer_and_model(family: str, spare_rows: bool):
    """megagpt's own tokenizer and a model of `family` on it, in memory; with
    `spare_rows` the embedding has rows past the tokenizer's ids (padded
    vocabulary), else exactly the tokenizer's."""
    from megagpt.data.tokenizer import train_bpe
    from megagpt.model.config import GPTConfig
    from megagpt.model.gpt import GPT

    tok = train_bpe(make_texts(120, seed=3), 300)
    rows = -(-tok.get_vocab_size() // 64) * 64 if spare_rows else tok.get_vocab_size()
    assert (rows > tok.get_vocab_size()) == spare_rows
    shape = {"gpt2": {}, "llama": {"n_kv_head": 2, "tie_embeddings": False, "mlp_hidden": 96}}[family]
    c = GPTConfig(family=family, vocab_size=rows, max_seq_len=64, n_layer=2, n_head=4, n_embd=64, eod_id=0, **shape)
    torch.manual_seed(11)
    model = GPT(c).eval()
    with torch.no_grad():  # wider logit gaps than an init's: greedy choices far from float rounding
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    return tok, model


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{family: (export folder, megagpt model, megagpt tokenizer)}: gpt2 with
    spare embedding rows, llama (untied, grouped-query) without."""
    from megagpt.export import write_export

    root = tmp_path_factory.mktemp("clients")
    out = {}
    for family, spare in (("gpt2", True), ("llama", False)):
        tok, model = tokenizer_and_model(family, spare)
        folder = root / family
        write_export(model, str(folder), tok.to_str().encode())
        out[family] = (folder, model, tok)
    return out


def check_client(got: dict, model, tok) -> None:
    """One client's report against megagpt: encodings, logits, greedy tokens."""
    from megagpt.generate import generate

    assert got["special"]["pad"] != got["special"]["eos"] == 0, got["special"]
    for text, seen in zip(TEXTS, got["texts"]):
        ids = tok.encode(text).ids
        assert seen["encoding"] == {"input_ids": ids, "attention_mask": [1] * len(ids)}, (got["transformers"], text)
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0]
        diff = (torch.tensor(seen["logits"]) - ours).abs().max().item()
        assert diff <= 1e-4, (got["transformers"], text, diff)
        assert seen["greedy"] == generate(model, ids, 8, stop=0), (got["transformers"], text)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_newest_transformers_reads_the_export_as_megagpt(exports, family):
    from hf_client import report

    folder, model, tok = exports[family]
    got = report(str(folder), TEXTS)
    assert got["transformers"] == transformers.__version__ and transformers.__version__.startswith("5.")
    check_client(got, model, tok)


@pytest.mark.slow  # about 15 s: a second transformers imported in a subprocess
def test_oldest_transformers_reads_the_export_as_megagpt(exports, transformers_4):
    """transformers 4.45.0: no token_type_ids (which GPT-2 would add to its
    embeddings and Llama's generate() refuses), the same logits and greedy tokens."""
    reports = run_client(transformers_4, {folder: TEXTS for folder, _, _ in exports.values()})
    for folder, model, tok in exports.values():
        got = reports[str(folder)]
        assert got["transformers"] == "4.45.0"
        check_client(got, model, tok)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_peft_lora_trains_merges_and_reloads(exports, family, tmp_path):
    """PEFT on the export as a user runs it: LoRA adapters on the attention
    start as the export itself (their B matrices are zero), a few steps with
    the standard collator lower the loss, and the merged model saves and
    reloads as a plain transformers folder with the same logits."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling

    folder = exports[family][0]
    tok = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    batch = DataCollatorForLanguageModeling(tok, mlm=False)([tok(t + tok.eos_token) for t in TEXTS])
    with torch.no_grad():
        before = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}[family]
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    lora.print_trainable_parameters()
    with torch.no_grad():
        assert torch.equal(lora(**batch).logits, before)  # B = 0: the adapters change nothing yet
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = lora(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    merged = lora.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    tok.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        want = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (got - want).abs().max().item() <= 1e-5
    assert (got - before).abs().max().item() > 1e-3  # the fine-tune is in the merged weights
