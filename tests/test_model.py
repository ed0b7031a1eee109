"""The plain GPT module: causality, attention backends, init, tying, decay groups, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from megagpt.flops import flops_per_token
from megagpt.model import attention
from megagpt.model.attention import resolve_backend
from megagpt.model.gpt import GPT, GPTConfig, decay_groups

V, T, L, H, C = 256, 32, 2, 4, 64


def make_model(seed: int = 0, attention: str = "sdpa", **kw) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=V, max_seq_len=T, n_layer=L, n_head=H, n_embd=C, attention=attention, **kw))
    model.init_weights(seed)
    return model.eval()


def tokens(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (batch, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("k", [0, 5, T - 1])
def test_causal(backend, k):
    model = make_model(attention=backend)
    idx = tokens()
    idx2 = idx.clone()
    idx2[:, k] = (idx[:, k] + 1) % V
    with torch.no_grad():
        a, b = model(idx), model(idx2)
    torch.testing.assert_close(a[:, :k], b[:, :k], atol=1e-6, rtol=0)
    diff = (a[:, k:] - b[:, k:]).abs().amax(dim=-1)  # (B, T - k)
    assert (diff > 1e-6).all()


def test_initial_loss_near_uniform():
    model = make_model(seed=3)
    idx = torch.randint(0, V, (8, T), generator=torch.Generator().manual_seed(1))
    tgt = torch.randint(0, V, (8, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        loss = model(idx, tgt).item()
    assert abs(loss - math.log(V)) < 0.1


def test_backends_agree():
    model = make_model()
    idx = tokens(4)
    with torch.no_grad():
        model.cfg.attention = "sdpa"
        a = model(idx)
        model.cfg.attention = "eager"
        b = model(idx)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_attn_matches_sdpa():
    # flash-attn-4 makes `flash_attn` a namespace package that imports even where
    # flash_attn.cute does not: ask the module that chooses the kernel.
    if not attention.flash_attn_available():
        pytest.skip(f"no FlashAttention here: {attention.flash_unavailable_reason()}")
    model = make_model().cuda().to(torch.bfloat16)
    idx = tokens(4).cuda()
    with torch.no_grad():
        model.cfg.attention = "sdpa"
        a = model(idx).float()
        model.cfg.attention = "flash_attn"
        b = model(idx).float()
    torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)


def test_resolve_backend():
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("eager", "cpu") == "eager"
    assert resolve_backend("sdpa", "cpu") == "sdpa"
    with pytest.raises(ValueError, match="flash-attn"):
        resolve_backend("flash_attn", "cpu")
    with pytest.raises(ValueError):
        resolve_backend("nope", "cpu")


def test_tied_head_counted_once():
    model = make_model()
    assert model.lm_head.weight is model.wte.weight
    per_block = 12 * C * C + 13 * C  # qkv, proj, fc, proj (+ biases), two LayerNorms
    expected = V * C + T * C + L * per_block + 2 * C
    assert model.num_params(exclude_position=False) == expected
    assert model.num_params() == expected - T * C
    assert sum(p.numel() for p in model.parameters()) == expected


def test_init_deterministic():
    a, b, c = make_model(seed=7), make_model(seed=7), make_model(seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    assert not torch.equal(sa["wte.weight"], sc["wte.weight"])
    assert not torch.equal(sa["blocks.1.mlp.proj.weight"], sc["blocks.1.mlp.proj.weight"])


def test_init_std():
    model = make_model(seed=1)
    std, resid = model.cfg.init_std, model.cfg.init_std / math.sqrt(2 * L)
    for blk in model.blocks:
        for w in (blk.attn.proj.weight, blk.mlp.proj.weight):
            assert w.std().item() == pytest.approx(resid, rel=0.05)
        for w in (blk.attn.qkv.weight, blk.mlp.fc.weight):
            assert w.std().item() == pytest.approx(std, rel=0.05)
        assert torch.all(blk.attn.proj.bias == 0) and torch.all(blk.ln_1.weight == 1)
    assert model.wte.weight.std().item() == pytest.approx(std, rel=0.05)


def test_decay_groups():
    model = make_model()
    decay, no_decay = decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    dec, nodec = {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}
    assert len(dec) == len(decay["params"]) and len(nodec) == len(no_decay["params"])
    assert not dec & nodec
    assert dec | nodec == {id(p) for p in model.parameters()}
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if isinstance(mod, nn.LayerNorm) or name == "bias":
                assert id(p) in nodec, (mod, name)
            elif isinstance(mod, (nn.Linear, nn.Embedding)):
                assert id(p) in dec, (mod, name)
    assert id(model.wte.weight) in dec and id(model.blocks[0].attn.qkv.bias) in nodec


def test_overfit_one_batch():
    model = make_model(seed=2).train()
    idx = tokens(4, seed=5)
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


def test_flops_per_token():
    # 6 * 1000 + 12 * 2 layers * 4 heads * 16 head_dim * 32 tokens = 6000 + 49152
    assert flops_per_token(1000, 2, 4, 16, 32) == 55152
    # The test model: N = 256*64 + 2*(12*64^2 + 13*64) + 2*64 = 116480 (no position embeddings).
    n = make_model().num_params()
    assert n == 116480
    assert flops_per_token(n, L, H, C // H, T) == 6 * 116480 + 49152 == 748032


def _compiled_block_run(device: str, family: str) -> tuple[list[float], list[float], int]:
    """Losses of three training steps of a 4-block model, eager and with compile_blocks, and
    Dynamo's count of distinct graphs for the compiled one."""
    from torch._dynamo.utils import counters

    out = []
    for compiled in (False, True):
        model = GPT(GPTConfig(vocab_size=V, max_seq_len=T, n_layer=4, n_head=H, n_embd=C, family=family))
        model.init_weights(0)
        model.to(device).train()
        if compiled:
            torch._dynamo.reset()
            counters.clear()
            model.compile_blocks()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for step in range(3):
            idx = tokens(2, seed=step).to(device)
            loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        out.append(losses)
    return out[0], out[1], counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_compiled_blocks_share_one_graph_and_train_as_eager(family):
    eager, compiled, graphs = _compiled_block_run("cpu", family)
    assert graphs == 1  # four blocks, one graph: compile time does not grow with depth
    for a, b in zip(eager, compiled):
        assert abs(a - b) <= 1e-4 * abs(a), (eager, compiled)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_blocks_on_cuda():
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    try:
        eager, compiled, graphs = _compiled_block_run("cuda", "llama")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert graphs == 1
    for a, b in zip(eager, compiled):
        assert abs(a - b) <= 1e-3 * abs(a), (eager, compiled)
