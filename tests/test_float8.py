"""model.fp8: which Linear layers torchao's float8 training converts, and the
one-line errors where it cannot run (megagpt/model/float8.py, config_checks)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from megagpt.config import ConfigError
from megagpt.model.config import GPTConfig
from megagpt.model.float8 import check_fp8_supported, convert, fp8_eligible, fp8_support_problem
from megagpt.model.gpt import GPT

REPO = Path(__file__).resolve().parents[1]
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None


def settings(*overrides: str):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from megagpt.config import register

    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))


def preset_on_meta(name: str, vocab: int) -> GPT:
    cfg = settings(f"model={name}", "data.seq_len=2048")
    gcfg = GPTConfig.from_settings(cfg.model, vocab_size=vocab, seq_len=2048, attention="sdpa")
    with torch.device("meta"):
        return GPT(gcfg)


def eligible(model: nn.Module, min_dim: int = 1024) -> list[str]:
    return [n for n, m in model.named_modules() if fp8_eligible(n, m, min_dim)]


def test_llama_1b_converts_every_block_linear_not_the_head():
    model = preset_on_meta("llama-1b", 128256)
    names = eligible(model)
    per_block = ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]  # 2048->3072, 2048->2048, 2048->16384, 8192->2048
    assert names == [f"blocks.{i}.{p}" for i in range(16) for p in per_block]
    assert "lm_head" not in names and isinstance(model.lm_head, nn.Linear)  # 2048 -> 128256, tied: kept
    # Every matmul but the head: the share of the model's linear FLOPs that float8 speeds up.
    converted = sum(model.get_submodule(n).weight.numel() for n in names)
    assert converted == 16 * (2048 * 3072 + 2048 * 2048 + 2048 * 16384 + 8192 * 2048)


def test_gpt2_124m_converts_nothing_at_the_default_min_dim():
    model = preset_on_meta("gpt2-124m", 50304)
    assert eligible(model) == []  # width 768 < 1024: these GEMMs would get slower in float8
    # At 768 everything but the head qualifies (768, 2304, 3072 are multiples of 16).
    assert len(eligible(model, 768)) == 4 * 12


def test_filter_rules():
    assert fp8_eligible("blocks.0.mlp.fc", nn.Linear(1024, 4096, device="meta"), 1024)
    assert not fp8_eligible("blocks.0.mlp.fc", nn.Linear(1024, 1000, device="meta"), 512)  # 1000 % 16
    assert not fp8_eligible("blocks.0.mlp.fc", nn.Linear(1008, 4096, device="meta"), 1024)  # in < min_dim
    assert not fp8_eligible("lm_head", nn.Linear(4096, 4096, device="meta"), 1024)
    assert not fp8_eligible("model.lm_head", nn.Linear(4096, 4096, device="meta"), 1024)
    assert not fp8_eligible("wte", nn.Embedding(4096, 4096, device="meta"), 1024)


@pytest.mark.parametrize(
    "recipe, torchao, cap, expected",
    [
        ("tensorwise", None, (9, 0), None),
        ("rowwise", None, (9, 0), None),
        ("tensorwise", None, (8, 9), None),
        ("rowwise", None, (8, 9), "rowwise needs compute capability >= 9.0; L40S has 8.9"),
        ("tensorwise", None, (8, 0), "tensorwise needs compute capability >= 8.9; L40S has 8.0"),
        (
            "tensorwise",
            None,
            None,
            "tensorwise needs a CUDA GPU of compute capability >= 8.9 (H100, H200, B200, L40S...); there is none here",
        ),
        ("tensorwise", "needs torchao, not installed here", (9, 0), "needs torchao, not installed here"),
        ("fast", None, (9, 0), "unknown recipe 'fast'; choose one of ('off', 'tensorwise', 'rowwise')"),
    ],
)
def test_support_problem(recipe, torchao, cap, expected):
    assert fp8_support_problem(recipe, torchao, cap, "L40S") == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_check_fp8_supported_is_one_line_on_cpu():
    with pytest.raises(ConfigError) as e:
        check_fp8_supported("tensorwise")
    msg = str(e.value)
    assert msg.startswith("model.fp8: ") and "\n" not in msg
    assert ("CUDA GPU" in msg) if HAS_TORCHAO else ("torchao" in msg)


def test_validate_fp8_settings(monkeypatch):
    from megagpt import config_checks
    from megagpt.config_checks import validate

    def error(*overrides, cuda=True):
        with pytest.raises(ConfigError) as e:
            validate(settings(*overrides), 1, cuda=cuda)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert error("model.fp8=fast") == "model.fp8: unknown recipe 'fast'; choose one of ('off', 'tensorwise', 'rowwise')"
    assert error("model.fp8_min_dim=0") == "model.fp8_min_dim: must be positive, got 0"
    validate(settings("model.fp8=off"), 1, cuda=False)
    monkeypatch.setattr(config_checks, "torchao_problem", lambda: None)
    assert error("model.fp8=tensorwise", cuda=False).startswith(
        "model.fp8: tensorwise needs a CUDA GPU of compute capability >= 8.9"
    )
    validate(settings("model.fp8=rowwise"), 1, cuda=True)  # the device's capability: checked at build
    monkeypatch.setattr(
        config_checks, "torchao_problem", lambda: 'needs torchao, not installed here (pip install -e ".[fp8]")'
    )
    assert error("model.fp8=tensorwise") == 'model.fp8: needs torchao, not installed here (pip install -e ".[fp8]")'


def tiny_llama(**kw) -> GPT:
    cfg = dict(
        family="llama",
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=64,
        mlp_hidden=128,
        bias=False,
        vocab_size=96,
        max_seq_len=16,
    )
    cfg.update(kw)
    model = GPT(GPTConfig(**cfg))
    model.init_weights(0)
    return model


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao not installed")
def test_convert_swaps_exactly_the_eligible_layers_on_meta():
    from torchao.float8.float8_linear import Float8Linear

    model = preset_on_meta("llama-1b", 128256)
    expected = eligible(model)
    assert convert(model, "tensorwise", 1024) == expected
    swapped = [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]
    assert swapped == expected
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.wte.weight  # still tied
    # megagpt's marks survive the swap: the residual projections keep their scaled init.
    assert model.blocks[3].attn.proj.is_residual_proj and model.blocks[3].mlp.proj.is_residual_proj
    assert not getattr(model.blocks[3].attn.qkv, "is_residual_proj", False)


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao not installed")
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_convert_trains_on_cpu_in_emulation(recipe):
    # torchao's emulation: float8 numerics computed in higher precision, so the
    # converted model runs here; its loss stays close to the bf16-free original.
    from torchao.float8.float8_linear import Float8Linear

    ref, model = tiny_llama(), tiny_llama()
    names = convert(model, recipe, 64, emulate=True)
    assert names == [f"blocks.{i}.{p}" for i in range(2) for p in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]
    assert all(isinstance(model.get_submodule(n), Float8Linear) for n in names)
    x = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(x, targets=x)
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - ref(x, targets=x).item()) < 0.05
    assert all(model.get_submodule(n).weight.grad is not None for n in names)
    assert convert(tiny_llama(), recipe, 4096, emulate=True) == []  # nothing that large here


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_trains_on_gpu(recipe):
    try:
        check_fp8_supported(recipe)
    except ConfigError as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    ref = tiny_llama(n_embd=256, mlp_hidden=1024, n_head=4, n_kv_head=2, vocab_size=512, max_seq_len=128).cuda()
    model = tiny_llama(n_embd=256, mlp_hidden=1024, n_head=4, n_kv_head=2, vocab_size=512, max_seq_len=128).cuda()
    assert len(convert(model, recipe, 256)) == 8
    x = torch.randint(0, 512, (4, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, ref_loss = model(x, targets=x), ref(x, targets=x)
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - ref_loss.item()) < 0.1


def _emulated_fp8_losses(rank, world_size, stage):
    """Three steps of build_engine's llama-tiny with model.fp8=tensorwise at ZeRO stage
    `stage` on 2 gloo ranks.  float8's kernels need an H100; torchao's emulation (the
    same float8 numerics computed in fp32) stands in for them here, through the engine's
    own conversion, so ZeRO-3's partitioned weights meet Float8Linear as on the GPU."""
    from megagpt.engine import build_engine, build_model_config, deepspeed_config
    from megagpt.model import float8

    real_convert = float8.convert
    float8.check_fp8_supported = lambda *a, **k: None  # no CUDA here: emulation instead
    float8.convert = lambda model, recipe, min_dim: real_convert(model, recipe, min_dim, emulate=True)
    cfg = settings(
        "model=llama-tiny",
        f"deepspeed=zero{stage}",
        "model.fp8=tensorwise",
        "model.fp8_min_dim=128",
        "data.seq_len=16",
        "trainer.micro_batch_size=2",
    )
    model_cfg = build_model_config(cfg, 256, "sdpa", None, "cpu")
    engine = build_engine(
        cfg,
        model_cfg,
        deepspeed_config(cfg, world_size, "cpu", model_cfg.n_embd),
        rank,
        world_size,
        torch.device("cpu"),
    )
    from torchao.float8.float8_linear import Float8Linear

    converted = sorted(n for n, m in engine.model.named_modules() if isinstance(m, Float8Linear))
    batch = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(rank))
    losses = [engine.train_batch([batch]).loss.item() for _ in range(3)]  # one batch again: the loss must fall
    return {"converted": converted, "losses": losses}


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao not installed")
def test_fp8_under_zero3_trains_as_under_zero0():
    # The defaults are ZeRO-3: float8 there must train exactly as with whole weights.
    from distributed import run_distributed

    zero0 = run_distributed(_emulated_fp8_losses, 0, timeout=300)
    zero3 = run_distributed(_emulated_fp8_losses, 3, timeout=300)
    for a, b in zip(zero0, zero3):
        # the block matmuls of width >= 128 (qkv, attention out, MLP in and out), not the head
        assert (
            a["converted"]
            == b["converted"]
            == sorted(f"blocks.{i}.{p}" for i in range(4) for p in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"))
        )
        # Steps 1 and 2 bit for bit: the same weights, gathered whole, cast to float8 alike.  After
        # that ZeRO-3's gradient-norm and update arithmetic (in partitions) rounds differently at
        # fp32's last bit, as it does without float8 (measured: 0 or 9e-8 relative over 6 steps);
        # float8's 3-bit mantissa turns an element that lands on the other side of a rounding
        # boundary into a larger change (measured here: 1.3e-6 at step 3, up to 9e-5 by step 6).
        assert a["losses"][:2] == b["losses"][:2], (a["losses"], b["losses"])
        assert abs(a["losses"][2] - b["losses"][2]) <= 1e-5 * abs(a["losses"][2]), (a["losses"], b["losses"])
    assert zero0[0]["losses"][2] < zero0[0]["losses"][1] < zero0[0]["losses"][0]  # it learns
