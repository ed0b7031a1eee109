"""Export to Hugging Face format and generation, from checkpoints of real
2-process ZeRO-3 runs: transformers loads the folders offline and its logits
and greedy tokens equal megagpt's; transformers.Trainer fine-tunes the export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import make_dataset, make_texts, torchrun

pytestmark = pytest.mark.slow  # real training jobs: the full suite only (docs/development.md)

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

RUNS = {
    # gpt2: tied embeddings, biases.
    "gpt2": ["model=tiny", "model.n_layer=2", "model.n_head=4", "model.n_embd=64"],
    # llama: untied head, 4 query heads on 2 key/value heads, and document
    # masking plus activation checkpointing exercised under ZeRO-3.
    "llama": [
        "model=llama-tiny",
        "model.n_layer=2",
        "model.n_head=4",
        "model.n_kv_head=2",
        "model.n_embd=64",
        "model.mlp_hidden=160",
        "model.doc_mask=true",
        "model.activation_checkpointing=1",
    ],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = make_dataset(root, n_docs=160, docs_per_shard=8)
    out = {}
    for family, model_args in RUNS.items():
        run_dir = root / family
        r = torchrun(
            [
                f"run.dir={run_dir}",
                "data=webdataset",
                f"data.urls={data}",
                "data.seq_len=32",
                "trainer.micro_batch_size=4",
                "trainer.max_steps=10",
                "trainer.save_every=5",
                "trainer.log_every=5",
                "optim.lr=3e-3",
                "optim.warmup_steps=2",
                "logger=none",
                "trainer.peak_flops=1e11",
                "export.at_end=true",
                *model_args,
            ],
            cwd=root,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"exported to {run_dir}/hf" in r.stdout
        out[family] = run_dir
    return out


def megagpt_model(run_dir):
    from megagpt.export import load_model

    return load_model(str(run_dir))[0]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_transformers_loads_export_and_logits_match(runs, family):
    run_dir = runs[family]
    hf_dir = run_dir / "hf"
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ):
        assert (hf_dir / name).is_file(), name
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    assert type(hf).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[family]
    if family == "llama":
        assert hf.config.num_key_value_heads == 2 and not hf.config.tie_word_embeddings
        assert hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    from megagpt.data.tokenizer import load_tokenizer

    ours_tok = load_tokenizer(str(hf_dir))
    text = "doc 7: alpha beta gamma the of and omega"
    assert tok(text)["input_ids"] == ours_tok.encode(text).ids
    assert tok.eos_token == "<|endoftext|>"

    model = megagpt_model(run_dir)
    # From 1: no end-of-document token (id 0), where the llama run's document masking and transformers' differ.
    ids = torch.randint(1, ours_tok.get_vocab_size(), (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    # trained weights, not an untouched init: the loss on real text is far below uniform
    enc = torch.tensor([tok(" ".join(make_texts(3, seed=5)))["input_ids"][:32]])
    with torch.no_grad():
        loss = hf(enc, labels=enc).loss.item()
    assert loss < torch.log(torch.tensor(float(hf.config.vocab_size))).item() - 0.5


def test_cli_export_sharded_equals_at_end(runs, tmp_path):
    from safetensors.torch import load_file

    run_dir = runs["llama"]
    out = tmp_path / "sharded"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "megagpt.export",
            "--checkpoint",
            str(run_dir / "checkpoints"),
            "--out",
            str(out),
            "--max-shard-bytes",
            "200000",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert f"exported {run_dir}/checkpoints/step_10 to {out}" in r.stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    merged = {}
    for s in shards:
        merged.update(load_file(out / s))
    whole = load_file(run_dir / "hf" / "model.safetensors")
    assert merged.keys() == whole.keys()
    assert all(torch.equal(merged[k], whole[k]) for k in whole)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ids = torch.arange(1, 20)[None]
    with torch.no_grad():
        assert (hf(ids).logits - megagpt_model(run_dir)(ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_generation_checkpoint_export_and_transformers_agree(runs, family):
    from megagpt.generate import generate, load

    run_dir = runs[family]
    ck_model, tok, eod = load(str(run_dir))
    ex_model, _, _ = load(str(run_dir / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "hf", local_files_only=True).eval()
    for text in ("doc 3: alpha", "the of and", "omega psi chi phi"):
        prompt = tok.encode(text).ids
        a = generate(ck_model, prompt, 12, stop=eod)
        b = generate(ex_model, prompt, 12, stop=eod)
        with torch.no_grad():
            c = hf.generate(
                torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=eod, pad_token_id=eod
            )[0, len(prompt) :].tolist()
        assert a == b == c, (text, a, b, c)
        assert len(a) >= 1


def test_generate_cli_prompts_and_interactive(runs):
    run_dir = runs["gpt2"]
    cmd = [sys.executable, "-m", "megagpt.generate", "--model", str(run_dir), "--max-new-tokens", "8"]
    r = subprocess.run(
        cmd + ["--prompt", "doc 1: alpha", "--prompt", "the", "--json"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["prompt"] for x in lines] == ["doc 1: alpha", "the"]
    assert all(1 <= len(x["ids"]) <= 8 for x in lines)
    from megagpt.generate import generate, load

    model, tok, eod = load(str(run_dir))
    assert lines[0]["ids"] == generate(model, tok.encode("doc 1: alpha").ids, 8, stop=eod)

    r = subprocess.run(
        cmd + ["--interactive", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3"],
        input="doc 2: beta\nthe of\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0].startswith("doc 2: beta") and any(x.startswith("the of") for x in out[1:])

    r = subprocess.run(
        [sys.executable, "-m", "megagpt.generate", "--model", str(run_dir / "nope"), "--prompt", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.startswith("megagpt.generate: error:") and len(r.stderr.splitlines()) == 1


def test_finetune_export_with_transformers_trainer(runs, tmp_path):
    """The documented downstream path: Trainer + causal-LM collator on the export."""
    hf_dir = runs["llama"] / "hf"
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True)
    texts = [f"question {i}: what is {i} plus one? answer: {i + 1}." for i in range(64)]
    train = [tok(t, truncation=True, max_length=32) for t in texts]

    def eval_loss():
        model.eval()
        batch = collator([dict(x) for x in train[:16]])
        with torch.no_grad():
            return model(**batch).loss.item()

    collator = transformers.DataCollatorForLanguageModeling(tok, mlm=False)
    before = eval_loss()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "ft"),
        per_device_train_batch_size=8,
        max_steps=30,
        learning_rate=3e-3,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
    result = trainer.train()
    after = eval_loss()
    assert result.training_loss > 0 and after < before - 0.5, (before, after)


def rehash(checkpoint) -> None:
    """Record a checkpoint's files as they are now in its manifest, and the manifest's
    checksum in its state: an edited checkpoint then verifies, and what is read next
    is the files themselves."""
    from megagpt.checkpoint import sha256_file

    manifest = json.loads((checkpoint / "manifest.json").read_text())
    for rel in manifest["files"]:
        size, digest = sha256_file(str(checkpoint / rel))
        manifest["files"][rel] = {"bytes": size, "sha256": digest}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    state = json.loads((checkpoint / "megagpt_state.json").read_text())
    state["manifest_sha256"] = sha256_file(str(checkpoint / "manifest.json"))[1]
    (checkpoint / "megagpt_state.json").write_text(json.dumps(state))


def _export_fails(path, tmp_path) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "megagpt.export", "--checkpoint", str(path), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megagpt.export: error: checkpoint "), r.stderr
    return lines[0]


def test_export_errors_are_one_line(runs, tmp_path):
    src = runs["gpt2"] / "checkpoints" / "step_10"

    incomplete = tmp_path / "incomplete" / "step_10"
    shutil.copytree(src, incomplete)
    (incomplete / "megagpt_state.json").unlink()
    assert "incomplete" in _export_fails(incomplete, tmp_path)

    damaged = tmp_path / "damaged" / "step_10"
    shutil.copytree(src, damaged)
    shard = sorted(damaged.glob("*optim_states.pt"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    assert f"{damaged} is damaged: {shard.name} has 1000 bytes" in _export_fails(damaged, tmp_path)
    # Without the manifest's checksum there is nothing to verify against: damaged too.
    state = json.loads((damaged / "megagpt_state.json").read_text())
    del state["manifest_sha256"]
    (damaged / "megagpt_state.json").write_text(json.dumps(state))
    assert f"{damaged} is damaged: megagpt_state.json names no manifest checksum" in _export_fails(damaged, tmp_path)
    # Its manifest made to agree with the cut shard: the shards themselves are read, and refused.
    rehash(damaged)
    assert "cannot consolidate the ZeRO-3 shards" in _export_fails(damaged, tmp_path)

    unknown = tmp_path / "unknown" / "step_10"
    shutil.copytree(src, unknown)
    state = json.loads((unknown / "megagpt_state.json").read_text())
    state["model"]["family"] = "mamba"
    (unknown / "megagpt_state.json").write_text(json.dumps(state))
    assert "unknown model family 'mamba'" in _export_fails(unknown, tmp_path)

    assert "no such directory" in _export_fails(tmp_path / "missing", tmp_path)
