"""ZeRO-3's settings (deepspeed.stage3_param_persistence_threshold, stage3_leaf_blocks,
stage3_module_granularity_threshold) and DeepCompile (deepspeed.deepcompile): the DeepSpeed
config each gives, their checks, the model as build_engine hands it to DeepSpeed, and real
2-rank ZeRO-3 runs that train the same losses with them as without.  None of them changes
the math: which parameters stay whole, and how many modules gather together, only moves
the same values around, so the losses agree (to fp32 rounding; in practice bit for bit)."""

from __future__ import annotations

import json

import pytest
from distributed import run_distributed
from helpers import make_dataset, torchrun
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import megagpt.config
import megagpt.train
from megagpt.config import ConfigError
from megagpt.config_checks import validate
from megagpt.engine import deepspeed_config


def make_cfg(*overrides: str):
    megagpt.config.register()
    with initialize_config_dir(config_dir=megagpt.train.CONF_DIR, version_base=None):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


# --- the DeepSpeed config ------------------------------------------------------------------


def test_persistence_threshold_auto_is_ten_times_the_width():
    zero = deepspeed_config(make_cfg(), 2, "cpu")["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 10 * 128  # model=tiny: n_embd 128
    assert (
        deepspeed_config(make_cfg("model=llama-1b"), 1, "cuda")["zero_optimization"][
            "stage3_param_persistence_threshold"
        ]
        == 20480
    )
    # the built model's width where it differs from model.n_embd (model.init_from's folder)
    assert (
        deepspeed_config(make_cfg(), 2, "cpu", n_embd=768)["zero_optimization"]["stage3_param_persistence_threshold"]
        == 7680
    )
    for value in (0, 12345):
        zero = deepspeed_config(
            make_cfg(f"deepspeed.stage3_param_persistence_threshold={value}"), 2, "cpu", n_embd=768
        )["zero_optimization"]
        assert zero["stage3_param_persistence_threshold"] == value


def test_module_granularity_threshold_is_deepspeeds_key():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    assert deepspeed_config(make_cfg(), 2, "cpu")["zero_optimization"]["stage3_module_granularity_threshold"] == 0
    zero = deepspeed_config(make_cfg("deepspeed.stage3_module_granularity_threshold=100000"), 2, "cpu")[
        "zero_optimization"
    ]
    assert zero["stage3_module_granularity_threshold"] == 100000
    assert DeepSpeedZeroConfig(**zero).module_granularity_threshold == 100000  # DeepSpeed reads it
    # ZeRO-0..2 have no such hooks: no stage3 keys at all
    assert (
        "stage3_module_granularity_threshold"
        not in deepspeed_config(make_cfg("deepspeed=zero2"), 2, "cpu")["zero_optimization"]
    )


def test_leaf_blocks_are_not_a_deepspeed_key():
    """set on the model (build_engine: set_z3_leaf_modules), not in the JSON."""
    assert deepspeed_config(make_cfg("deepspeed.stage3_leaf_blocks=true"), 2, "cpu") == deepspeed_config(
        make_cfg(), 2, "cpu"
    )


def test_deepcompile_config_and_its_refusal_on_cpu():
    assert "compile" not in deepspeed_config(make_cfg(), 1, "cuda")
    ds = deepspeed_config(make_cfg("deepspeed.deepcompile=true"), 1, "cuda")
    assert ds["compile"] == {"deepcompile": True}
    from deepspeed.compile.config import CompileConfig

    assert CompileConfig(**ds["compile"]).deepcompile is True
    with pytest.raises(ConfigError) as e:
        deepspeed_config(make_cfg("deepspeed.deepcompile=true"), 1, "cpu")
    assert str(e.value) == "deepspeed.deepcompile: needs CUDA (DeepSpeed's DeepCompile); this run is on cpu"


# --- the checks -----------------------------------------------------------------------------

CHECKS = [
    (
        ["deepspeed.stage3_param_persistence_threshold=-1"],
        "deepspeed.stage3_param_persistence_threshold: must be >= 0 or null (auto: 10 x model.n_embd), got -1",
    ),
    (
        ["deepspeed.stage3_module_granularity_threshold=-5"],
        "deepspeed.stage3_module_granularity_threshold: must be >= 0 (0: off), got -5",
    ),
    (
        ["deepspeed=zero2", "deepspeed.stage3_leaf_blocks=true"],
        "deepspeed.stage3_leaf_blocks: needs deepspeed.zero_stage=3, got 2",
    ),
    (
        ["deepspeed=zero0", "deepspeed.stage3_module_granularity_threshold=100"],
        "deepspeed.stage3_module_granularity_threshold: needs deepspeed.zero_stage=3, got 0",
    ),
    (
        ["deepspeed=zero0", "deepspeed.deepcompile=true"],
        "deepspeed.deepcompile: needs deepspeed.zero_stage 1, 2 or 3, got 0",
    ),
    (
        ["deepspeed.deepcompile=true", "model.compile=false"],
        "deepspeed.deepcompile: compiles the model: it needs model.compile=true or null (auto), got false",
    ),
]


@pytest.mark.parametrize("overrides, line", CHECKS)
def test_checks_name_the_key(overrides, line):
    with pytest.raises(ConfigError) as e:
        validate(make_cfg(*overrides), 1, cuda=True)
    assert str(e.value) == line


def test_deepcompile_is_refused_on_cpu_at_start():
    with pytest.raises(ConfigError) as e:
        validate(make_cfg("deepspeed.deepcompile=true"), 1, cuda=False)
    assert str(e.value) == "deepspeed.deepcompile: needs CUDA (DeepSpeed's DeepCompile); training runs on CPU here"


def test_settings_that_pass():
    for overrides in (
        [],
        ["deepspeed.stage3_leaf_blocks=true", "deepspeed.stage3_module_granularity_threshold=1"],
        ["deepspeed.deepcompile=true"],
        ["deepspeed=zero1", "deepspeed.deepcompile=true", "model.compile=true"],
        ["deepspeed.stage3_param_persistence_threshold=0"],
    ):
        validate(make_cfg(*overrides), 2, cuda=True)


# --- the model DeepSpeed gets (2 gloo ranks in this process's children) --------------------


def _engine_hooks(rank, world_size, runs):
    """Build the engine as run.build does, once per list of overrides in `runs`: what
    build_engine set on the model for ZeRO-3, and one step's loss."""
    import torch

    from megagpt.engine import build_engine, build_model_config
    from megagpt.model.gpt import Block

    out = []
    for overrides in runs:
        cfg = make_cfg("model.n_layer=2", "model.n_head=4", "model.n_embd=64", "data.seq_len=16", *overrides)
        model_cfg = build_model_config(cfg, 300, "sdpa", 0, "cpu")
        engine = build_engine(
            cfg,
            model_cfg,
            deepspeed_config(cfg, world_size, "cpu", model_cfg.n_embd),
            rank,
            world_size,
            torch.device("cpu"),
        )
        model = engine.model
        external = [id(p) for p in getattr(model, "_external_params", {}).values()]
        batch = torch.randint(0, 300, (cfg.trainer.micro_batch_size, 17), generator=torch.Generator().manual_seed(rank))
        out.append(
            {
                "leaves": sorted(type(m).__name__ for m in model.modules() if getattr(m, "_z3_leaf", False)),
                "blocks_are_leaves": all(
                    getattr(b, "_z3_leaf", False) for b in model.modules() if isinstance(b, Block)
                ),
                "head_external": id(model.lm_head.weight) in external,
                "loss": engine.train_batch([batch]).loss.item(),
            }
        )  # one step trains through the hooks
    return out


@pytest.mark.slow
def test_build_engine_sets_leaf_blocks_and_the_heads_external_parameter():
    """Blocks as leaves, by stage3_leaf_blocks or by a granularity threshold between the blocks'
    (5553 parameters per layer here) and the whole model's (6221)."""
    ranks = run_distributed(
        _engine_hooks,
        [
            [],
            ["deepspeed.stage3_leaf_blocks=true", "model.loss_chunk_tokens=8"],
            ["deepspeed.stage3_module_granularity_threshold=6000"],
        ],
        timeout=300,
    )
    for base, leafy, granular in ranks:
        assert base["leaves"] == [] and not base["head_external"]
        assert leafy["blocks_are_leaves"] and leafy["leaves"] == ["Block", "Block"]
        assert leafy["head_external"]  # the chunked loss reads the head's weight in GPT.forward
        assert leafy["loss"] == pytest.approx(base["loss"], rel=1e-6)
        assert "Block" in granular["leaves"] and "GPT" not in granular["leaves"]
        assert granular["loss"] == pytest.approx(base["loss"], rel=1e-6)


def test_a_granularity_threshold_that_makes_the_whole_model_a_leaf_is_refused():
    """DeepSpeed 0.19.8 makes the root module a leaf once the threshold reaches its granularity,
    then fails in backward; build_engine refuses it first, in one line."""
    import torch

    from megagpt.engine.faults import check_module_granularity
    from megagpt.model.gpt import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=320, max_seq_len=32, n_layer=2, n_head=4, n_embd=64))
    check_module_granularity(6000, model)
    check_module_granularity(0, model)
    with pytest.raises(ConfigError) as e:
        check_module_granularity(100000, model)
    assert str(e.value) == (
        "deepspeed.stage3_module_granularity_threshold: 100000 makes the whole model one "
        "ZeRO-3 leaf (its granularity is 6221 parameters per layer), which DeepSpeed cannot "
        "train; use less than 6221, or deepspeed.stage3_leaf_blocks=true"
    )
    with torch.device("meta"):  # above 1e9 parameters DeepSpeed makes no leaf of the whole model
        big = GPT(
            GPTConfig(
                vocab_size=128256,
                max_seq_len=32,
                n_layer=16,
                n_head=32,
                n_kv_head=8,
                n_embd=2048,
                family="llama",
                bias=False,
            )
        )
    check_module_granularity(10**8, big)


# --- real 2-rank ZeRO-3 runs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("zero3"), n_docs=160, docs_per_shard=8)


def _run(data_dir, run_dir, extra):
    """test_train_e2e's small run (common), 4 steps: each step's loss, and the job's output."""
    args = [
        f"run.dir={run_dir}",
        "data=webdataset",
        f"data.urls={data_dir}",
        "data.seq_len=32",
        "model.n_layer=2",
        "model.n_head=4",
        "model.n_embd=64",
        "trainer.micro_batch_size=4",
        "trainer.max_steps=4",
        "trainer.save_every=100",
        "trainer.log_every=1",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        "trainer.peak_flops=1e11",
        "logger=none",
        *extra,
    ]
    r = torchrun(args, cwd=run_dir.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ZeRO stage 3" in r.stdout and "2 rank(s)" in r.stdout
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()], r


@pytest.fixture(scope="module")
def baseline(data_dir, tmp_path_factory):
    return _run(data_dir, tmp_path_factory.mktemp("baseline") / "run", [])[0]


@pytest.mark.parametrize(
    "extra",
    [
        ["deepspeed.stage3_leaf_blocks=true"],
        # the blocks as leaves (granularity 5553), not the whole model (6221: refused, see above)
        ["deepspeed.stage3_module_granularity_threshold=6000"],
        ["deepspeed.stage3_param_persistence_threshold=0"],  # nothing kept whole: every parameter gathered
    ],
    ids=["leaf_blocks", "granularity", "persist_nothing"],
)
@pytest.mark.slow
def test_zero3_settings_train_the_same_losses(data_dir, baseline, tmp_path, extra):
    losses, _ = _run(data_dir, tmp_path / "run", extra)
    assert len(losses) == len(baseline) == 4
    for a, b in zip(losses, baseline):
        assert abs(a - b) <= 1e-6 * b, (losses, baseline)


@pytest.mark.slow
def test_a_whole_model_leaf_is_refused_in_a_run(data_dir, tmp_path):
    """deepspeed.stage3_module_granularity_threshold=100000 on this small model: the one-line
    error on every rank, before the weights are initialised, not DeepSpeed's crash in backward."""
    args = [
        f"run.dir={tmp_path / 'run'}",
        "data=webdataset",
        f"data.urls={data_dir}",
        "data.seq_len=32",
        "model.n_layer=2",
        "model.n_head=4",
        "model.n_embd=64",
        "trainer.max_steps=2",
        "logger=none",
        "deepspeed.stage3_module_granularity_threshold=100000",
    ]
    r = torchrun(args, cwd=tmp_path)
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("megagpt: error")]
    assert errors and all(
        "deepspeed.stage3_module_granularity_threshold: 100000 makes the whole model" in ln for ln in errors
    ), r.stderr[-3000:]


@pytest.mark.slow
def test_deepcompile_on_cpu_is_one_line_at_start(tmp_path):
    import os
    import subprocess
    import sys

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env["MEGAGPT_CACHE"] = str(tmp_path / "cache")
    p = subprocess.run(
        [sys.executable, "-m", "megagpt.train", "deepspeed.deepcompile=true", "logger=none"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0] == (
        "megagpt: error (rank 0): deepspeed.deepcompile: needs CUDA (DeepSpeed's DeepCompile); "
        "training runs on CPU here"
    )
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "cache").exists()  # before any heavy work


def _compiled_steps(rank, world_size, n_layer):
    """Two ZeRO-3 steps eager, then two compiled (model.compile=true): the losses, whether the
    blocks became leaves, and what Dynamo counted while the compiled engine trained."""
    import torch
    from torch._dynamo.utils import counters

    from megagpt.engine import build_engine, build_model_config
    from megagpt.model.gpt import Block

    out = {}
    for compiled in (False, True):
        cfg = make_cfg(
            f"model.n_layer={n_layer}",
            "model.n_head=4",
            "model.n_embd=64",
            "data.seq_len=16",
            f"model.compile={str(compiled).lower()}",
        )
        model_cfg = build_model_config(cfg, 300, "sdpa", 0, "cpu")
        engine = build_engine(
            cfg,
            model_cfg,
            deepspeed_config(cfg, world_size, "cpu", model_cfg.n_embd),
            rank,
            world_size,
            torch.device("cpu"),
        )
        counters.clear()
        gen = torch.Generator().manual_seed(rank)
        batches = [torch.randint(0, 300, (cfg.trainer.micro_batch_size, 17), generator=gen) for _ in range(2)]
        out[compiled] = {
            "losses": [engine.train_batch([b]).loss.item() for b in batches],
            "leaves": all(getattr(b, "_z3_leaf", False) for b in engine.model.modules() if isinstance(b, Block)),
            "graph_breaks": sum(counters["graph_break"].values()),
            "graphs": counters["stats"]["unique_graphs"],
        }
    return out


@pytest.mark.slow
def test_compiled_blocks_under_zero3_are_leaves_and_compile_once_without_breaks():
    """model.compile compiles each block (GPT.compile_blocks); under ZeRO-3 the blocks become
    leaves by default, so no gather hook runs inside a compiled block: no graph break, and
    the three blocks share one graph.  (Compiling the whole model through DeepSpeed's
    engine.compile, as before, broke the graph at every hooked module: 38 breaks for 4 layers.)"""
    for by_rank in run_distributed(_compiled_steps, 3, timeout=400):
        eager, compiled = by_rank[False], by_rank[True]
        assert not eager["leaves"] and compiled["leaves"]
        assert compiled["graph_breaks"] == 0 and compiled["graphs"] == 1, compiled
        for a, b in zip(eager["losses"], compiled["losses"]):
            assert abs(a - b) <= 1e-4 * abs(a), (eager, compiled)  # inductor's kernels: test_train_e2e's tolerance


def test_memory_efficient_linear_is_deepspeeds_key_and_zero3_only():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    assert deepspeed_config(make_cfg(), 2, "cpu")["zero_optimization"]["memory_efficient_linear"] is True
    zero = deepspeed_config(make_cfg("deepspeed.stage3_memory_efficient_linear=false"), 2, "cpu")["zero_optimization"]
    assert zero["memory_efficient_linear"] is False
    assert DeepSpeedZeroConfig(**zero).memory_efficient_linear is False  # DeepSpeed reads it
    with pytest.raises(ConfigError) as e:
        validate(make_cfg("deepspeed=zero2", "deepspeed.stage3_memory_efficient_linear=false"), 1, cuda=False)
    assert str(e.value) == "deepspeed.stage3_memory_efficient_linear: needs deepspeed.zero_stage=3, got 2"


def _linear_after_builds(rank, world_size, settings):
    """For each memory_efficient_linear setting in turn (one process, as a Hydra -m sweep):
    which F.linear training ran with, and one step's loss."""
    import torch

    from megagpt.engine import build_engine, build_model_config

    out = []
    for value in settings:
        cfg = make_cfg(
            "model.n_layer=2",
            "model.n_head=4",
            "model.n_embd=64",
            "data.seq_len=16",
            f"deepspeed.stage3_memory_efficient_linear={str(value).lower()}",
        )
        model_cfg = build_model_config(cfg, 300, "sdpa", 0, "cpu")
        engine = build_engine(
            cfg,
            model_cfg,
            deepspeed_config(cfg, world_size, "cpu", model_cfg.n_embd),
            rank,
            world_size,
            torch.device("cpu"),
        )
        batch = torch.randint(0, 300, (cfg.trainer.micro_batch_size, 17), generator=torch.Generator().manual_seed(0))
        out.append({"linear": torch.nn.functional.linear.__module__, "loss": engine.train_batch([batch]).loss.item()})
    return out


@pytest.mark.slow
def test_memory_efficient_linear_false_trains_with_torchs_linear_even_after_true():
    """DeepSpeed's replacement of F.linear is process-wide and sticky; a later engine with
    stage3_memory_efficient_linear=false gets torch's back, and both train the same loss."""
    for on, off, on_again in run_distributed(_linear_after_builds, [True, False, True], timeout=300):
        assert on["linear"] == "deepspeed.runtime.zero.linear" == on_again["linear"]
        assert off["linear"].startswith("torch"), off
        assert off["loss"] == pytest.approx(on["loss"], rel=1e-6) and on_again["loss"] == on["loss"]
