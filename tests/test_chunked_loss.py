"""The chunked output head + cross-entropy (model.loss_chunk_tokens, megagpt/model/loss.py):
the same loss and gradients as the plain path (one matmul, F.cross_entropy on fp32 logits),
without the (tokens, vocab) logits; its auto setting, and model.compile's; and real ZeRO-3
engines (1 and 2 ranks) training the same losses with it as without.

Tolerances.  fp32: with one chunk covering every token the loss is bit-identical (the same
log_softmax and nll_loss kernels) and the gradients differ from autograd's by about one ulp
(log_softmax's backward kernel and torch.exp round a few logits differently): <= 2e-7 of the
largest entry.  Across chunks only the order of the sums changes: the loss over the chunks,
the weight's gradient over the tokens, and with 1-token chunks BLAS's matrix-vector path
sums the hidden states' gradient over the vocabulary in another order: <= 1e-6 of the loss,
<= 1e-5 of the largest gradient entry (measured: 1e-7, 3e-6).  bf16 inputs: against an fp32
reference, as close as the plain bf16 path (one bf16 rounding of the gradients, 2^-8 relative,
plus the per-chunk rounding of the weight's gradient before its fp32 accumulation).
"""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F
from helpers import make_dataset, torchrun

from megagpt.config import ConfigError, ModelConfig
from megagpt.model.config import GPTConfig, auto_loss_chunk_tokens, check, for_device
from megagpt.model.gpt import GPT
from megagpt.model.loss import IGNORE_INDEX, linear_cross_entropy

N, C, V = 300, 32, 1000  # tokens, width, vocabulary


def _inputs(dtype=torch.float32, seed=0, n=N, c=C, v=V):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, c, generator=g)
    weight = torch.randn(v, c, generator=g) * 0.3
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::7] = IGNORE_INDEX  # ignored tokens: F.cross_entropy's default ignore_index
    return hidden.to(dtype), weight.to(dtype), targets


def _run(hidden, weight, targets, chunk, scale=1.0):
    """(loss, d hidden, d weight): chunk 0 is the plain path of GPT.forward."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    if chunk == 0:
        loss = F.cross_entropy((h @ w.t()).float(), targets)
    else:
        loss = linear_cross_entropy(h, w, targets, chunk)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over the largest |b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# --- exactness -------------------------------------------------------------------------


def test_one_chunk_covering_every_token_is_the_plain_loss():
    ref = _run(*_inputs(), 0)
    for chunk in (N, N + 5, 4096):
        loss, gh, gw = _run(*_inputs(), chunk)
        assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.float32
        assert torch.equal(loss, ref[0])  # bit for bit
        assert _rel(gh, ref[1]) <= 2e-7 and _rel(gw, ref[2]) <= 2e-7


@pytest.mark.parametrize("chunk", [1, 7, 64, 100, 150, 299])  # 100, 150 divide N=300; 1 is the extreme
def test_chunks_match_the_plain_loss_within_fp32_rounding(chunk):
    ref = _run(*_inputs(), 0)
    loss, gh, gw = _run(*_inputs(), chunk)
    assert abs(loss.item() - ref[0].item()) <= 1e-6 * abs(ref[0].item())
    assert _rel(gh, ref[1]) <= 1e-5 and _rel(gw, ref[2]) <= 1e-5
    # rows of ignored targets get no gradient, as in the plain path
    assert torch.equal(gh[::7], torch.zeros_like(gh[::7]))


def _run_fused(hidden, weight, targets, chunk):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = linear_cross_entropy(h, w, targets, chunk, fused=True)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [N, 64, 7])  # 7: two chunk shapes (the last one shorter)
def test_fused_chunks_match_the_plain_loss_within_fp32_rounding(chunk):
    """fused=True (model.compile): each chunk's log-softmax, loss and logits' gradient are one
    torch.compile'd function; measured here within 1.2e-7 (loss) and 1.4e-6 (gradients)."""
    ref = _run(*_inputs(), 0)
    loss, gh, gw = _run_fused(*_inputs(), chunk)
    assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.float32
    assert abs(loss.item() - ref[0].item()) <= 1e-6 * abs(ref[0].item())
    assert _rel(gh, ref[1]) <= 1e-5 and _rel(gw, ref[2]) <= 1e-5
    assert torch.equal(gh[::7], torch.zeros_like(gh[::7]))  # ignored targets: no gradient


def test_fused_bf16_within_bf16_rounding():
    ref = _run(*_inputs(torch.float32), 0)
    plain = _run(*_inputs(torch.bfloat16), 0)
    loss, gh, gw = _run_fused(*_inputs(torch.bfloat16), 64)
    assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    assert abs(loss.item() - ref[0].item()) <= 1e-4 * ref[0].item()
    for got, base, exact in ((gh, plain[1], ref[1]), (gw, plain[2], ref[2])):
        assert _rel(got, exact) <= max(1.5 * _rel(base, exact), 2**-8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_chunks_on_cuda_in_bf16():
    ref = _run(*(x.cuda() for x in _inputs(torch.float32)), 0)
    plain = _run(*(x.cuda() for x in _inputs(torch.bfloat16)), 0)
    for chunk in (N, 64):
        loss, gh, gw = _run_fused(*(x.cuda() for x in _inputs(torch.bfloat16)), chunk)
        assert abs(loss.item() - ref[0].item()) <= 1e-3 * ref[0].item()
        for got, base, exact in ((gh, plain[1], ref[1]), (gw, plain[2], ref[2])):
            assert _rel(got, exact) <= max(1.5 * _rel(base, exact), 2**-7)


def test_the_incoming_gradient_scales_both_gradients():
    """DeepSpeed scales the loss before backward (1 / accumulation steps, a loss scale)."""
    ref = _run(*_inputs(), 0, scale=0.375)
    _, gh, gw = _run(*_inputs(), 64, scale=0.375)
    assert _rel(gh, ref[1]) <= 1e-5 and _rel(gw, ref[2]) <= 1e-5


def test_bf16_inputs_within_bf16_rounding():
    """bf16 hidden states and weight (DeepSpeed's bf16): the gradients come back in bf16, the loss
    in fp32, as close to an fp32 reference as the plain bf16 path's."""
    ref = _run(*_inputs(torch.float32), 0)
    plain = _run(*_inputs(torch.bfloat16), 0)
    for chunk in (N, 64, 100):
        loss, gh, gw = _run(*_inputs(torch.bfloat16), chunk)
        assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
        assert abs(loss.item() - ref[0].item()) <= 1e-4 * ref[0].item()
        for got, base, exact in ((gh, plain[1], ref[1]), (gw, plain[2], ref[2])):
            assert _rel(got, exact) <= max(1.5 * _rel(base, exact), 2**-8), (chunk, _rel(got, exact))


def test_fp16_inputs_under_a_loss_scale_within_fp16_rounding():
    """fp16 (deepspeed.precision=fp16): a logit's gradient (softmax - onehot) / count would fall
    into fp16's subnormals (here ~4e-6) before backward applies DeepSpeed's loss scale, so the
    fp16 path keeps fp32 gradients of the summed loss and applies 1/count and the scale in
    backward, as precise as the plain fp16 path, which scales before it casts."""
    ref = _run(*_inputs(torch.float32), 0, scale=2.0**16)
    plain = _run(*_inputs(torch.float16), 0, scale=2.0**16)
    for chunk in (N, 64):
        loss, gh, gw = _run(*_inputs(torch.float16), chunk, scale=2.0**16)
        assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.float16
        assert abs(loss.item() - ref[0].item()) <= 1e-4 * ref[0].item()
        for got, base, exact in ((gh, plain[1], ref[1]), (gw, plain[2], ref[2])):
            assert _rel(got, exact) <= max(1.5 * _rel(base, exact), 2**-10), (chunk, _rel(got, exact))


def test_all_tokens_ignored_is_nan_as_plain():
    hidden, weight, targets = _inputs()
    targets[:] = IGNORE_INDEX
    assert torch.isnan(_run(hidden, weight, targets, 0)[0]) and torch.isnan(_run(hidden, weight, targets, 64)[0])


def test_a_second_backward_is_refused():
    """backward scales the saved gradients in place: retain_graph and a second backward would
    scale them twice, so autograd's version check stops it."""
    h, w, t = (x.detach() for x in _inputs())
    h.requires_grad_()
    loss = linear_cross_entropy(h, w.requires_grad_(), t, 64)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_without_gradients_nothing_is_kept():
    hidden, weight, targets = _inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden.requires_grad_(), weight, targets, 64)
    ref = F.cross_entropy((hidden @ weight.t()).float(), targets)
    assert loss.grad_fn is None and abs(loss.item() - ref.item()) <= 1e-6 * ref.item()


# --- in the model ----------------------------------------------------------------------


def _model(chunk: int, **kw) -> GPT:
    cfg = GPTConfig(vocab_size=512, max_seq_len=32, n_layer=2, n_head=4, n_embd=32, loss_chunk_tokens=chunk, **kw)
    model = GPT(cfg)
    model.init_weights(7)
    return model


@pytest.mark.parametrize("family, tied", [("gpt2", True), ("gpt2", False), ("llama", True)])
def test_model_loss_and_every_gradient_match_the_plain_path(family, tied):
    """GPT.forward with loss_chunk_tokens: the same loss and the same gradient for every
    parameter; tied, the head's gradient reaches the embedding (wte.weight) with its own."""
    bias = family == "gpt2"
    idx = torch.randint(0, 512, (3, 32), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(idx, -1, dims=1)
    grads = {}
    for chunk in (0, 40):  # 40 does not divide the 96 tokens
        model = _model(chunk, family=family, tie_embeddings=tied, bias=bias)
        loss = model(idx, targets)
        loss.backward()
        grads[chunk] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    (loss0, g0), (loss1, g1) = grads[0], grads[40]
    assert abs(loss1.item() - loss0.item()) <= 1e-6 * loss0.item()
    assert g0.keys() == g1.keys() and ("lm_head.weight" in g0) != tied
    for name in g0:
        assert _rel(g1[name], g0[name]) <= 1e-5, name
    if tied:  # the embedding's gradient holds both uses: the rows of tokens not in idx come from the head only
        unused = torch.ones(512, dtype=torch.bool)
        unused[idx.flatten()] = False
        assert g1["wte.weight"][unused].abs().sum() > 0


def test_model_eval_and_logits_unchanged():
    idx = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(2))
    plain, chunked = _model(0), _model(16)
    with torch.no_grad():
        assert torch.equal(plain(idx), chunked(idx))  # no targets: logits, as before
        a, b = plain(idx, idx), chunked(idx, idx)
    assert abs(a.item() - b.item()) <= 1e-6 * a.item()


# --- memory ----------------------------------------------------------------------------


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn() runs."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _peak_bytes(fn) -> int:
    """The peak of CPU memory allocated while fn() runs (the profiler's allocation events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def test_chunked_memory_saved_and_peak(capsys):
    """512 tokens, width 32, a 16384-token vocabulary: the plain path saves the (tokens, V) fp32
    log-probabilities for backward, 32 MiB; the chunked one saves only the two gradients (the
    hidden states' and the head's, 2.1 MiB), and allocates at most two 128-token chunks of fp32
    logits at a time."""
    n, c, v, chunk = 512, 32, 16384, 128
    hidden, weight, targets = _inputs(n=n, c=c, v=v)
    h = hidden.requires_grad_()
    w = weight.requires_grad_()

    def plain():
        return F.cross_entropy((h @ w.t()).float(), targets)

    def chunked():
        return linear_cross_entropy(h, w, targets, chunk)

    saved = {f.__name__: _saved_bytes(f) for f in (plain, chunked)}
    peak = {f.__name__: _peak_bytes(lambda f=f: f().backward()) for f in (plain, chunked)}
    logits = n * v * 4
    assert saved["plain"] >= logits  # the log-probabilities (and the inputs)
    assert saved["chunked"] == (n * c + v * c) * 4  # the two gradients, nothing else
    assert peak["plain"] >= 2 * logits  # logits and log-probabilities at once, then their gradients
    assert peak["chunked"] <= 2 * chunk * v * 4 + 3 * v * c * 4 + 4 * n * c * 4
    with capsys.disabled():
        print(
            f"\nsaved for backward: plain {saved['plain']:,} B, chunked {saved['chunked']:,} B; "
            f"peak allocated (forward + backward): plain {peak['plain']:,} B, chunked {peak['chunked']:,} B"
        )


# --- the auto settings -------------------------------------------------------------------


def test_auto_settings_resolve_for_the_device_and_explicit_values_win():
    auto = ModelConfig()
    assert (auto.compile, auto.loss_chunk_tokens) == (None, None)
    assert for_device(auto, "cpu", 50304) == {"compile": False, "loss_chunk_tokens": 0}
    assert for_device(auto, "cuda", 50304) == {"compile": True, "loss_chunk_tokens": 5120}
    for compile_ in (True, False):
        for device in ("cpu", "cuda"):
            m = ModelConfig(compile=compile_, loss_chunk_tokens=333)
            assert for_device(m, device, 50304) == {"compile": compile_, "loss_chunk_tokens": 333}
    assert for_device(ModelConfig(loss_chunk_tokens=0), "cuda", 128256)["loss_chunk_tokens"] == 0
    # about 2^28 logits (1 GiB in fp32) per chunk, whole multiples of 1024 tokens
    assert [auto_loss_chunk_tokens(v) for v in (128256, 50304, 32000, 4096, 10**7)] == [2048, 5120, 8192, 65536, 1024]
    c = GPTConfig.from_settings(auto, vocab_size=50257, seq_len=16, attention="sdpa", device_type="cuda")
    assert (c.vocab_size, c.compile, c.loss_chunk_tokens) == (50304, True, 5120)
    c = GPTConfig.from_settings(auto, vocab_size=50257, seq_len=16, attention="sdpa")  # CPU by default
    assert (c.compile, c.loss_chunk_tokens) == (False, 0)


def test_the_model_sees_concrete_values():
    check(ModelConfig())  # the settings: None is auto
    with pytest.raises(ConfigError, match=r"^model.loss_chunk_tokens: must be a number of tokens here"):
        GPTConfig(vocab_size=64, max_seq_len=8, loss_chunk_tokens=None)
    with pytest.raises(ConfigError, match=r"^model.compile: must be true or false here"):
        GPTConfig(vocab_size=64, max_seq_len=8, compile=None)
    with pytest.raises(ConfigError, match=r"^model.loss_chunk_tokens: must be >= 0"):
        check(ModelConfig(loss_chunk_tokens=-1))


# --- real ZeRO-3 engines -------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("chunked"), n_docs=160, docs_per_shard=8)


def _losses(data_dir, run_dir, nproc, extra):
    """test_train_e2e's small run, 4 steps, each step's loss."""
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
    r = torchrun(args, cwd=run_dir.parent, nproc=nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ZeRO stage 3" in r.stdout
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "nproc, extra",
    [
        (2, []),  # tied head (the default): the gradient reaches wte.weight through ZeRO-3's hooks
        (1, ["model.tie_embeddings=false", "trainer.grad_accum=2"]),  # an untied head; the loss scaled by 1/2
    ],
)
@pytest.mark.slow
def test_zero3_engine_trains_the_same_losses(data_dir, tmp_path, nproc, extra):
    """A real DeepSpeed ZeRO-3 engine (gloo, CPU): the chunked loss (64-token chunks of the 128
    tokens per micro-batch) trains the same losses as the plain one, within fp32 rounding
    (measured: <= 1e-7 relative).  One rank, also compiled (model.compile=true, CUDA's default
    with the chunked loss): the head's weight is read inside the compiled forward, which
    DeepSpeed's parameter getter does not gather; build_engine's registration does."""
    t0 = time.time()
    plain = _losses(data_dir, tmp_path / "plain", nproc, extra + ["model.loss_chunk_tokens=0"])
    chunked = _losses(data_dir, tmp_path / "chunked", nproc, extra + ["model.loss_chunk_tokens=64"])
    assert len(plain) == len(chunked) == 4
    for a, b in zip(plain, chunked):
        assert abs(a - b) <= 1e-6 * a, (plain, chunked)
    assert chunked[-1] < chunked[0]
    if nproc == 1:
        compiled = _losses(
            data_dir, tmp_path / "compiled", nproc, extra + ["model.loss_chunk_tokens=64", "model.compile=true"]
        )
        for a, b in zip(plain, compiled):
            assert abs(a - b) <= 1e-4 * a, (plain, compiled)  # inductor's kernels: test_train_e2e's tolerance
    print(f"{nproc} rank(s): plain {plain}, chunked {chunked} ({time.time() - t0:.0f} s)")
