"""Continued pretraining from a Hugging Face folder (`model.init_from`), on
CPU and offline: small random models built with transformers' own config
classes, saved in shards with an index (`max_shard_size`), with the data's
tokenizer in the folder; real 2-rank ZeRO-3 torchrun jobs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from distributed import run_distributed
from helpers import FAULT_TRAIN, kill_job, make_dataset, torchrun, torchrun_popen, wait_for

pytestmark = pytest.mark.slow  # real training jobs: the full suite only (docs/development.md)

SEQ = 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("init_from"), n_docs=160, docs_per_shard=8)


def vocab_of(data_dir: Path) -> int:
    from megagpt.data.tokenizer import load_tokenizer

    return load_tokenizer(str(data_dir)).get_vocab_size()


def hf_model(kind: str, vocab: int):
    import transformers

    torch.manual_seed(7)
    small = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    if kind == "llama":  # grouped-query attention, untied head
        return transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**small, num_key_value_heads=2, tie_word_embeddings=False)
        )
    if kind == "llama3":  # Llama 3.2's layout: tied, llama3 RoPE scaling that matters at this length
        return transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                **small,
                num_key_value_heads=2,
                tie_word_embeddings=True,
                rope_theta=500000.0,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                },
            )
        )
    if kind == "mistral":
        return transformers.MistralForCausalLM(
            transformers.MistralConfig(**small, num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False)
        )
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128)
        )
    raise ValueError(kind)


def save_folder(model, data_dir: Path, out: Path) -> Path:
    model.save_pretrained(out, max_shard_size="100KB")  # several shards and an index
    shutil.copy(data_dir / "tokenizer.json", out / "tokenizer.json")
    return out


def args(data_dir: Path, folder: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [
        f"model.init_from={folder}",
        "data=webdataset",
        f"data.urls={data_dir}",
        f"data.seq_len={SEQ}",
        "trainer.micro_batch_size=4",
        f"trainer.max_steps={steps}",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "optim.lr=1e-3",
        "optim.warmup_steps=2",
        "logger=none",
        f"run.dir={run_dir}",
        "trainer.peak_flops=1e11",
        *extra,
    ]


def first_batch_loss(model, data_dir: Path) -> float:
    """transformers' mean next-token loss over the two ranks' first micro-batches,
    as megagpt's loader hands them out."""
    from test_config import make_cfg

    from megagpt.data.loader import Batches
    from megagpt.data.source import open_training_data
    from megagpt.runtime import Env

    cfg = make_cfg("data=webdataset", f"data.urls={data_dir}", f"data.seq_len={SEQ}", "trainer.micro_batch_size=4")
    losses = []
    for rank in (0, 1):
        data = open_training_data(cfg, Env(rank, 2, rank, 2))
        batches = Batches(data.mix, rank, 2, 4)
        windows = batches.next_windows().long()
        batches.close()
        with torch.no_grad():
            logits = model(windows[:, :-1]).logits.float()
        losses.append(
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), windows[:, 1:].reshape(-1)).item()
        )
    return sum(losses) / 2


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["llama", "llama3", "mistral", "gpt2"])
def test_first_loss_is_transformers_loss(data_dir, tmp_path, kind):
    """Step-0 parity: the first step's loss (before any update), under 2-rank
    ZeRO-3 with the weights loaded into the partitions, is transformers' loss
    on the same tokens."""
    model = hf_model(kind, vocab_of(data_dir)).eval()
    folder = save_folder(model, data_dir, tmp_path / "hf")
    assert (folder / "model.safetensors.index.json").exists()
    r = torchrun(args(data_dir, folder, tmp_path / "run", 1), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"weights: {folder}" in r.stdout and "ZeRO stage 3" in r.stdout
    expected = first_batch_loss(model, data_dir)
    got = metrics(tmp_path / "run")[0]["loss"]
    assert abs(got - expected) <= 1e-5, (kind, got, expected)


@pytest.mark.parametrize("kind", ["llama", "llama3", "mistral", "gpt2"])
def test_module_loader_gives_transformers_logits(data_dir, tmp_path, kind):
    """The loader the engine uses (one module at a time, memory-mapped), on a
    plain model: logits within 1e-4 of transformers'."""
    from megagpt import hf_import
    from megagpt.engine import init_weights
    from megagpt.model.gpt import GPT

    model = hf_model(kind, vocab_of(data_dir)).eval()
    folder = save_folder(model, data_dir, tmp_path / "hf")
    source = hf_import.open_folder(str(folder))
    ours = GPT(source.config)
    init_weights(ours, seed=0, rank=0, sharded=False, load=hf_import.module_loader(source, source.config))
    tokens = torch.randint(0, vocab_of(data_dir), (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours.eval()(tokens), model(tokens).logits, atol=1e-4, rtol=0)


def exported_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


TRANSFORMERS_KEYS = (
    "architectures",
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "hidden_act",
    "rope_scaling",
    "sliding_window",
)


def test_round_trip_through_a_zero3_checkpoint(data_dir, tmp_path):
    """Import (2-rank ZeRO-3), one step whose update is skipped (a NaN loss
    injected on rank 1: no update anywhere), export: every tensor is the
    original bit for bit and config.json is equivalent, rope_scaling included."""
    from transformers import AutoConfig

    model = hf_model("llama3", vocab_of(data_dir))
    folder = save_folder(model, data_dir, tmp_path / "hf")
    run_dir = tmp_path / "run"
    r = torchrun(
        args(data_dir, folder, run_dir, 1, "export.at_end=true"),
        cwd=tmp_path,
        env_extra={"MEGAGPT_FAULT_NAN_STEPS": "1:1"},
        script=FAULT_TRAIN,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "update skipped" in r.stderr
    exported, original = exported_tensors(run_dir / "hf"), exported_tensors(folder)
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    ours, theirs = (AutoConfig.from_pretrained(p).to_dict() for p in (run_dir / "hf", folder))
    for key in TRANSFORMERS_KEYS:
        assert ours.get(key) == theirs.get(key), (key, ours.get(key), theirs.get(key))


def test_continued_pretraining_resumes_from_its_own_checkpoint_and_generates_like_transformers(data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from megagpt.generate import generate, load

    folder = save_folder(hf_model("llama", vocab_of(data_dir)), data_dir, tmp_path / "hf")
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    job = torchrun_popen(args(data_dir, folder, run_dir, 20, "trainer.save_every=10"), cwd=tmp_path, log=log)
    wait_for(
        lambda: (run_dir / "checkpoints" / "step_10" / "megagpt_state.json").exists(),
        240,
        job,
        "checkpoint step_10",
        poll=0.05,
        detail=lambda: log.read_text()[-3000:],
    )
    kill_job(job)
    assert not (run_dir / "checkpoints" / "step_20").exists()
    restart = [
        a
        for a in args(data_dir, folder, run_dir, 20, "trainer.save_every=10", "export.at_end=true")
        if a != "logger=none"
    ]  # W&B offline: its run config must record the source too
    r = torchrun(restart, cwd=tmp_path, env_extra={"WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step_10 at step 10" in r.stdout
    assert "weights:" not in r.stdout  # not loaded from the folder again
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"config_sha256" in wandb_run.read_bytes() and str(folder).encode() in wandb_run.read_bytes()
    state = json.loads((run_dir / "checkpoints" / "step_20" / "megagpt_state.json").read_text())
    assert state["init_from"]["path"] == str(folder) and state["init_from"]["architectures"] == ["LlamaForCausalLM"]
    assert state["step"] == 20
    losses = [m["loss"] for m in metrics(run_dir)]
    assert losses[-1] < losses[0]
    # transformers reads the export and generates greedily what megagpt generates
    theirs = AutoModelForCausalLM.from_pretrained(run_dir / "hf").eval()
    ours, _, _ = load(str(run_dir / "hf"))
    prompt = [5, 17, 42, 8]
    expected = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)[
        0, len(prompt) :
    ].tolist()
    assert generate(ours, prompt, 12) == expected


# -- the memory of a load ---------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _load_and_measure(rank: int, world: int, folder: str) -> dict:
    """Build the model partitioned (ZeRO-3) and load it, sampling this process's
    resident memory every millisecond while the weights go in."""
    import deepspeed

    from megagpt import hf_import
    from megagpt.engine import init_weights
    from megagpt.model.gpt import GPT

    source = hf_import.open_folder(folder)
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=True):
        model = GPT(source.config)
    baseline, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    init_weights(model, seed=0, rank=rank, sharded=True, load=hf_import.module_loader(source, source.config))
    done.set()
    sampler.join()
    return {"growth": peak[0] - baseline}


def test_loading_holds_one_module_at_a_time(tmp_path):
    """4 ranks, each holding a quarter of a ~100 MB model: while rank 0 (which
    reads the files) loads it, its resident memory grows by less than the
    whole model plus one block, although its pages of the memory-mapped files
    count in that growth; a rank that read the whole model into memory would
    hold that much in copies on top."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=8000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf", max_shard_size="20MB")
    model_bytes = sum(p.stat().st_size for p in (tmp_path / "hf").glob("*.safetensors"))
    block_bytes = 4 * (4 * 512 * 512 + 3 * 512 * 1408 + 2 * 512)
    results = run_distributed(_load_and_measure, str(tmp_path / "hf"), world_size=4, timeout=300)
    growth = results[0]["growth"]
    assert model_bytes > 80e6
    assert growth < model_bytes + block_bytes, (growth / 1e6, model_bytes / 1e6, block_bytes / 1e6)
    # What the loader achieves: about two of the largest modules (measured 33 MB for 110 MB: the
    # embedding and the head are 16 MB each).  Holding every file's mapped pages, or glibc keeping
    # the freed buffers (both before the engine's heap trimming, build._heap_trimmer, and the per-module mappings), grew
    # rank 0 by 215 MB.
    assert growth < model_bytes / 2, (growth / 1e6, model_bytes / 1e6)
    print(
        f"\nrank 0 grew by {growth / 1e6:.1f} MB loading a {model_bytes / 1e6:.1f} MB model "
        f"(one block: {block_bytes / 1e6:.1f} MB); other ranks: "
        f"{[round(r['growth'] / 1e6, 1) for r in results[1:]]} MB"
    )


# -- bad input --------------------------------------------------------------------------------


def _break(folder: Path, how: str) -> str:
    """Damage a good folder one way; returns what the error line must say."""
    index = folder / "model.safetensors.index.json"
    if how == "no_config":
        (folder / "config.json").unlink()
        return "has no config.json"
    if how == "no_weights":
        for p in folder.glob("*.safetensors"):
            p.unlink()
        index.unlink()
        return "has neither model.safetensors nor model.safetensors.index.json"
    if how == "missing_shard":
        shard = sorted(folder.glob("model-*.safetensors"))[-1]
        shard.unlink()
        return f"names {shard.name}, which is missing"
    if how == "shape":
        config = json.loads((folder / "config.json").read_text())
        config["intermediate_size"] = 192  # the stored MLP weights are 176 wide
        (folder / "config.json").write_text(json.dumps(config))
        return "config.json's shape needs"
    if how == "architecture":
        config = json.loads((folder / "config.json").read_text())
        config["architectures"], config["model_type"] = ["Gemma2ForCausalLM"], "gemma2"
        (folder / "config.json").write_text(json.dumps(config))
        return "Gemma2ForCausalLM"
    if how == "tokenizer":
        tokenizer = json.loads((folder / "tokenizer.json").read_text())
        tokenizer["model"]["vocab"]["zzz-not-ours"] = len(tokenizer["model"]["vocab"]) + 1000
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
        return "prepared with another tokenizer than"
    if how == "preset":
        return "model.n_layer: 4 disagrees with"
    raise ValueError(how)


@pytest.mark.parametrize(
    "how", ["no_config", "no_weights", "missing_shard", "shape", "architecture", "tokenizer", "preset"]
)
def test_bad_folder_stops_every_rank_with_one_line(data_dir, tmp_path, how):
    folder = save_folder(hf_model("llama", vocab_of(data_dir)), data_dir, tmp_path / "hf")
    expected = _break(folder, how)
    extra = ("model=llama-tiny",) if how == "preset" else ()  # a preset whose shape is not the folder's
    t0 = time.time()
    r = torchrun(args(data_dir, folder, tmp_path / "run", 2, *extra), cwd=tmp_path)
    assert r.returncode != 0
    assert re.search(r"exitcode\s*:\s*2\b", r.stderr), r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("megagpt: error")]
    for rank in (0, 1):
        mine = [ln for ln in lines if ln.startswith(f"megagpt: error (rank {rank}): ")]
        assert len(mine) == 1 and expected in mine[0], (how, lines)
    assert "training steps" not in r.stdout and not (tmp_path / "run" / "checkpoints").exists()
    assert time.time() - t0 < 120


def test_prepare_takes_the_model_folder_as_tokenizer(data_dir, tmp_path):
    """`prepare --tokenizer DIR` with the model folder: the data's tokenizer is the folder's."""
    folder = save_folder(hf_model("llama", vocab_of(data_dir)), data_dir, tmp_path / "hf")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("alpha beta gamma " * 50)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "megagpt.data.prepare",
            "--input",
            str(src),
            "--output",
            str(tmp_path / "data"),
            "--tokenizer",
            str(folder),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "data" / "tokenizer.json").read_text()) == json.loads(
        (folder / "tokenizer.json").read_text()
    )
