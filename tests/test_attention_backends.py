"""Attention kernels (megagpt/model/attention.py): FlashAttention's dispatch
(FA4 / FA2) and its varlen segments against the SDPA path's boolean mask;
SDPA's kernel choice (model.sdpa_backend).  What needs a GPU is marked gpu."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest
import torch

from megagpt.config import ConfigError
from megagpt.model import attention as A
from megagpt.model.attention import (
    Visibility,
    causal_attention,
    choose_flash_impl,
    choose_sdpa_backend,
    resolve_sdpa_backend,
)
from megagpt.model.visibility import cu_seqlens, cu_seqlens_from_eod, document_ids

REPO = Path(__file__).resolve().parents[1]
EOD = 0


def packed(batch: int, length: int, seed: int, eod_rate: float = 0.15) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, 50, (batch, length), generator=g)
    idx[torch.rand(batch, length, generator=g) < eod_rate] = EOD
    return idx


def varlen_visibility(cu: torch.Tensor, n: int) -> torch.Tensor:
    """(n, n) over the flattened batch: token i sees token j iff both lie in one
    segment of cu and j <= i (FlashAttention varlen with causal=True)."""
    seg = torch.zeros(n, dtype=torch.long)
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        seg[a:b] = s
    i = torch.arange(n)
    return (seg[:, None] == seg[None, :]) & (i[None, :] <= i[:, None])


def block_diagonal(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) per-row mask -> (B*T, B*T): rows never see each other."""
    B, _, T, _ = mask.shape
    out = torch.zeros(B * T, B * T, dtype=torch.bool)
    for b in range(B):
        out[b * T : (b + 1) * T, b * T : (b + 1) * T] = mask[b, 0]
    return out


# --- varlen segments == the SDPA path's document mask --------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_cu_seqlens_give_exactly_the_document_mask(seed):
    B, T = 3, 24
    idx = packed(B, T, seed)
    # edge cases: an EOD first and last in a row, two EODs in a row, a row with none
    idx[0, 0] = EOD
    idx[0, -1] = EOD
    idx[1, 5:7] = EOD
    idx[2] = torch.arange(1, T + 1)
    vis = Visibility.of(idx, eod_id=EOD)
    cu, longest = vis.varlen()
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == B * T
    assert (cu[1:] > cu[:-1]).all()  # no empty segments
    assert longest == int((cu[1:] - cu[:-1]).max()) and longest == T  # row 2 is one document
    assert torch.equal(varlen_visibility(cu, B * T), block_diagonal(vis.mask(idx.device)))
    assert torch.equal(cu, cu_seqlens_from_eod(idx, EOD)[0])


def test_cu_seqlens_by_hand():
    # row 0: "a b EOD | c EOD | d" ; row 1: "EOD | e f g h EOD"
    idx = torch.tensor([[5, 6, EOD, 7, EOD, 8], [EOD, 1, 2, 3, 4, EOD]])
    assert document_ids(idx, EOD).tolist() == [[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]]
    cu, longest = cu_seqlens(document_ids(idx, EOD))
    assert cu.tolist() == [0, 3, 5, 6, 7, 12] and longest == 5


# --- which FlashAttention runs --------------------------------------------------------------


@pytest.mark.parametrize(
    "device, cap, fa4, fa2, expected",
    [
        ("cpu", None, True, True, None),
        ("cuda", (9, 0), True, True, "fa4"),  # H100: FlashAttention 4 first
        ("cuda", (10, 0), True, False, "fa4"),  # B200
        ("cuda", (9, 0), False, True, "fa2"),  # H100 without flash-attn-4
        ("cuda", (8, 0), True, True, "fa2"),  # A100: FA4 targets Hopper and Blackwell
        ("cuda", (8, 0), True, False, None),
        ("cuda", (8, 9), False, True, "fa2"),
        ("cuda", (7, 5), False, True, None),
        ("cuda", (9, 0), False, False, None),
    ],
)
def test_choose_flash_impl(device, cap, fa4, fa2, expected):
    assert choose_flash_impl(device, cap, fa4, fa2) == expected


@pytest.fixture
def fresh_imports(monkeypatch):
    monkeypatch.setattr(A, "_imported", {})
    monkeypatch.setattr(A, "_impl_by_device", {})
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)


def test_flash_attn_4_alone_is_not_taken_for_flash_attn_2(tmp_path, monkeypatch, fresh_imports):
    # flash-attn-4 installs flash_attn/cute/ only: `flash_attn` then imports as a
    # namespace package without flash_attn_func, which must not count as FA2.
    cute = tmp_path / "flash_attn" / "cute"
    cute.mkdir(parents=True)
    (cute / "__init__.py").write_text("def flash_attn_func(*a, **k): pass\ndef flash_attn_varlen_func(*a, **k): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert A.fa4_module() is not None
    assert A.fa2_module() is None and "only flash-attn-4" in A._import("flash_attn")[1]


def test_flash_unavailable_is_reported(fresh_imports, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn -> ImportError
    assert A.fa2_module() is None and A.fa4_module() is None
    assert A.flash_impl("cuda") is None or torch.cuda.is_available()
    assert A.choose_flash_impl("cuda", (9, 0), A.fa4_module() is not None, A.fa2_module() is not None) is None


def _reference_flash(q, k, v, causal=True, **_):
    """FlashAttention's dense API in eager maths: (B, T, H, D), GQA, causal
    aligned to the end of the keys."""
    T, S = q.size(1), k.size(1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    att = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    qpos = torch.arange(S - T, S)[:, None]
    att = att.masked_fill(torch.arange(S)[None, :] > qpos, float("-inf"))
    return (att.softmax(-1) @ v).transpose(1, 2)


def _reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, **_):
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and causal
    assert max_seqlen_q == int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    out = torch.empty_like(q)
    for a, b in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
        out[a:b] = _reference_flash(q[None, a:b], k[None, a:b], v[None, a:b])[0]
    return out


def fake_flash(returns_lse: bool) -> types.SimpleNamespace:
    wrap = (lambda f: lambda *a, **k: (f(*a, **k), None)) if returns_lse else (lambda f: f)
    return types.SimpleNamespace(flash_attn_func=wrap(_reference_flash), flash_attn_varlen_func=wrap(_reference_varlen))


@pytest.mark.parametrize("impl", ["fa4", "fa2"])
@pytest.mark.parametrize("doc_mask", [False, True])
def test_flash_path_matches_sdpa_through_a_reference_kernel(impl, doc_mask, monkeypatch):
    # The plumbing of _flash (layouts, GQA, varlen reshapes, FA4's (out, lse))
    # on CPU, with the FlashAttention API computed in eager maths.
    monkeypatch.setattr(A, "flash_impl", lambda *a, **k: impl)
    monkeypatch.setattr(
        A, "_imported", {"flash_attn.cute": (fake_flash(True), ""), "flash_attn": (fake_flash(False), "")}
    )
    B, H, KV, T, D = 2, 4, 2, 16, 8
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, n, T, D, generator=g) for n in (H, KV, KV))
    vis = Visibility.of(packed(B, T, 3, 0.2), eod_id=EOD if doc_mask else None)
    torch.testing.assert_close(
        causal_attention(q, k, v, "flash_attn", vis), causal_attention(q, k, v, "sdpa", vis), atol=1e-5, rtol=1e-5
    )


def test_flash_path_with_a_cache_matches_sdpa(monkeypatch):
    monkeypatch.setattr(A, "flash_impl", lambda *a, **k: "fa4")
    monkeypatch.setattr(A, "_imported", {"flash_attn.cute": (fake_flash(True), "")})
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 3, 8, generator=g)  # 3 new tokens after 5 cached ones
    k, v = torch.randn(1, 2, 8, 8, generator=g), torch.randn(1, 2, 8, 8, generator=g)
    vis = Visibility(3, offset=5)
    torch.testing.assert_close(
        causal_attention(q, k, v, "flash_attn", vis), causal_attention(q, k, v, "sdpa", vis), atol=1e-5, rtol=1e-5
    )


def test_fa4_with_dropout_falls_back(monkeypatch):
    monkeypatch.setattr(A, "flash_impl", lambda *a, **k: "fa4")
    monkeypatch.setattr(A, "_imported", {"flash_attn.cute": (None, "unused"), "flash_attn": (None, "absent")})
    q = torch.randn(1, 2, 4, 8)
    torch.manual_seed(0)
    a = causal_attention(q, q, q, "flash_attn", dropout_p=0.5)
    torch.manual_seed(0)
    b = causal_attention(q, q, q, "sdpa", dropout_p=0.5)
    torch.testing.assert_close(a, b)


def _failing_flash(*a, **k):
    raise RuntimeError("cute DSL: kernel compilation failed\nmore detail")


def _wrong_flash(q, k, v, causal=True, **_):  # a broken kernel: wrong values
    return _reference_flash(q, k, v[:, :1].expand_as(v) + 1.0), None


@pytest.mark.parametrize("doc_mask", [False, True])
def test_flash_trial_passes_a_kernel_that_computes_attention(doc_mask, monkeypatch):
    monkeypatch.setattr(A, "flash_impl", lambda *a, **k: "fa4")
    monkeypatch.setattr(A, "_imported", {"flash_attn.cute": (fake_flash(True), "")})
    assert A.flash_trial(4, 2, 8, doc_mask, device="cpu", dtype=torch.float32, seq_len=32) is None


@pytest.mark.parametrize(
    "kernel, expected",
    [
        (_failing_flash, "^RuntimeError: cute DSL: kernel compilation failed$"),  # one line
        (_wrong_flash, "^its output differs from SDPA's by up to "),
    ],
)
def test_flash_trial_says_why_a_kernel_cannot_train(kernel, expected, monkeypatch):
    import re

    monkeypatch.setattr(A, "flash_impl", lambda *a, **k: "fa4")
    monkeypatch.setattr(A, "_imported", {"flash_attn.cute": (types.SimpleNamespace(flash_attn_func=kernel), "")})
    why = A.flash_trial(4, 2, 8, device="cpu", dtype=torch.float32, seq_len=32)
    assert why is not None and re.search(expected, why), why


def test_auto_falls_back_to_sdpa_when_flash_fails_its_trial(monkeypatch):
    # run._try_flash: auto keeps FlashAttention that passes, falls back (saying why)
    # from one that fails, and an explicit flash_attn stops the run with the reason.
    from megagpt import run
    from megagpt.model.config import GPTConfig

    cfg = GPTConfig(vocab_size=64, max_seq_len=32, n_layer=1, n_head=4, n_kv_head=2, n_embd=32, attention="flash_attn")
    cpu = torch.device("cpu")
    tried = []

    def trial(n_head, n_kv_head, head_dim, doc_mask, device, dtype):  # the run's shape and precision
        tried.append((n_head, n_kv_head, head_dim, doc_mask, dtype))
        return A.flash_trial(n_head, n_kv_head, head_dim, doc_mask, device, torch.float32, seq_len=32)

    monkeypatch.setattr(A, "flash_impl", lambda *a, **k: "fa4")
    monkeypatch.setattr(run, "flash_trial", trial)
    lines = []
    monkeypatch.setattr(A, "_imported", {"flash_attn.cute": (fake_flash(True), "")})
    assert run._try_flash(cfg, "auto", cpu, "bf16", lines.append).attention == "flash_attn"
    assert lines == ["attention: flash_attn (model.attention=auto)"]
    assert tried == [(4, 2, 8, False, torch.bfloat16)]
    monkeypatch.setattr(
        A, "_imported", {"flash_attn.cute": (types.SimpleNamespace(flash_attn_func=_failing_flash), "")}
    )
    assert run._try_flash(cfg, "auto", cpu, "fp16", lines.append).attention == "sdpa"
    assert lines[-1] == (
        "attention: sdpa (model.attention=auto; FlashAttention not used: its trial call at this "
        "model's head shape failed: RuntimeError: cute DSL: kernel compilation failed)"
    )
    assert tried[-1][-1] == torch.float16
    with pytest.raises(
        ConfigError,
        match="^model.attention=flash_attn: FlashAttention cannot train this run: its "
        "trial call at this model's head shape failed: RuntimeError: cute DSL",
    ):
        run._try_flash(cfg, "flash_attn", cpu, "bf16", None)
    # fp32 runs: no FlashAttention kernel takes fp32, so nothing is tried.
    calls = len(tried)
    assert run._try_flash(cfg, "auto", cpu, "fp32", lines.append).attention == "sdpa"
    assert lines[-1] == (
        "attention: sdpa (model.attention=auto; FlashAttention not used: it takes fp16 or bf16, "
        "and deepspeed.precision is fp32)"
    )
    with pytest.raises(ConfigError, match="deepspeed.precision is fp32$"):
        run._try_flash(cfg, "flash_attn", cpu, "fp32", None)
    assert len(tried) == calls
    sdpa = GPTConfig(vocab_size=64, max_seq_len=32, n_layer=1, n_head=4, n_embd=32, attention="sdpa")
    monkeypatch.setattr(run, "flash_trial", None)  # never tried for another backend
    assert run._try_flash(sdpa, "auto", cpu, "bf16", lines.append) is sdpa
    assert lines[-1] == "attention: sdpa (model.attention=auto)"


def test_resolve_backend_message_names_both_flash_packages():
    with pytest.raises(ValueError, match="flash-attn-4.*flash-attn 2"):
        A.resolve_backend("flash_attn", "cpu")


# --- SDPA's kernel --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "times, expected",
    [
        ({"cudnn": 1.0e-3, "flash": 2.0e-3}, "cudnn"),
        ({"cudnn": 3.0e-3, "flash": 2.0e-3}, "flash"),
        ({"cudnn": None, "flash": 2.0e-3}, "flash"),  # cuDNN could not run this shape
        ({"cudnn": 1.0e-3, "efficient": float("inf")}, "cudnn"),
        ({"cudnn": 2.0e-3, "flash": 2.0e-3}, "cudnn"),  # a tie: the first listed
        ({"cudnn": None, "flash": None}, None),
        ({}, None),
    ],
)
def test_choose_sdpa_backend(times, expected):
    assert choose_sdpa_backend(times) == expected


def test_auto_times_the_real_shape_and_logs_both(monkeypatch):
    asked, lines = {}, []

    def fake_timing(batch, n_head, n_kv_head, seq_len, head_dim, candidates, doc_mask):
        asked.update(shape=(batch, n_head, n_kv_head, seq_len, head_dim), candidates=candidates, doc_mask=doc_mask)
        return {"cudnn": 1.5e-3, candidates[1]: 2.5e-3}, {}

    monkeypatch.setattr(A, "time_sdpa_backends", fake_timing)
    shape = dict(batch=8, n_head=32, n_kv_head=8, seq_len=2048, head_dim=64)
    assert resolve_sdpa_backend("auto", "cuda", **shape, log=lines.append) == "cudnn"
    assert asked == {"shape": (8, 32, 8, 2048, 64), "candidates": ("cudnn", "flash"), "doc_mask": False}
    assert len(lines) == 1 and "cudnn 1.50 ms" in lines[0] and "flash 2.50 ms" in lines[0]
    assert resolve_sdpa_backend("auto", "cuda", **shape, doc_mask=True, log=None) == "cudnn"
    assert asked["candidates"] == ("cudnn", "efficient")  # flash takes no mask
    # Explicit kernels are taken as given on CUDA, without timing.
    monkeypatch.setattr(A, "time_sdpa_backends", None)
    assert resolve_sdpa_backend("math", "cuda", **shape) == "math"
    with pytest.raises(ConfigError, match="^model.sdpa_backend: flash takes no mask"):
        resolve_sdpa_backend("flash", "cuda", **shape, doc_mask=True)


@pytest.mark.parametrize("doc_mask", [False, True])
def test_timing_runs_each_kernel_and_reports_the_ones_that_cannot(doc_mask):
    # The timing loop itself, on CPU tensors: math runs here, cuDNN does not.
    times, errors = A.time_sdpa_backends(
        2,
        4,
        2,
        16,
        8,
        candidates=("math", "cudnn"),
        doc_mask=doc_mask,
        device="cpu",
        dtype=torch.float32,
        warmup=1,
        iters=2,
    )
    assert times["math"] > 0 and times["cudnn"] is None and set(errors) == {"cudnn"}
    assert "\n" not in errors["cudnn"] and errors["cudnn"]
    assert choose_sdpa_backend(times) == "math"


def test_sdpa_backend_on_cpu():
    shape = dict(batch=2, n_head=4, n_kv_head=2, seq_len=16, head_dim=8)
    assert resolve_sdpa_backend("auto", "cpu", **shape) is None
    with pytest.raises(
        ConfigError,
        match="^model.sdpa_backend: cudnn selects a CUDA kernel and training runs on CPU here; leave it auto$",
    ):
        resolve_sdpa_backend("cudnn", "cpu", **shape)
    with pytest.raises(ConfigError, match="unknown kernel 'fast'"):
        resolve_sdpa_backend("fast", "cpu", **shape)


def test_a_chosen_kernel_is_ignored_on_cpu_tensors(monkeypatch):
    q = torch.randn(1, 2, 6, 8)
    ref = causal_attention(q, q, q, "sdpa")
    torch.testing.assert_close(causal_attention(q, q, q, "sdpa", sdpa_backend="cudnn"), ref)


def settings(*overrides: str):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from megagpt.config import register

    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))


@pytest.mark.parametrize(
    "overrides, cuda, message",
    [
        (
            ["model.sdpa_backend=cudnn"],
            False,
            "model.sdpa_backend: cudnn selects a CUDA kernel and training runs on CPU here; leave it auto",
        ),
        (
            ["model.sdpa_backend=math"],
            False,
            "model.sdpa_backend: math selects a CUDA kernel and training runs on CPU here; leave it auto",
        ),
        (
            ["model.sdpa_backend=fast"],
            True,
            "model.sdpa_backend: unknown kernel 'fast'; choose one of ('auto', 'cudnn', 'flash', 'efficient', 'math')",
        ),
        (
            ["model.sdpa_backend=flash", "model.doc_mask=true"],
            True,
            "model.sdpa_backend: flash takes no mask, and model.doc_mask=true needs one; use cudnn, efficient or auto",
        ),
        (
            ["model.attention=flash_attn", "deepspeed.precision=fp32"],
            True,  # at start, before the data and the model
            "model.attention: flash_attn takes fp16 or bf16, and deepspeed.precision is fp32; use sdpa or auto",
        ),
    ],
)
def test_validate_sdpa_backend(overrides, cuda, message):
    from megagpt.config_checks import validate

    with pytest.raises(ConfigError) as e:
        validate(settings(*overrides), 1, cuda=cuda)
    assert str(e.value) == message


def test_validate_accepts_the_sensible_settings():
    from megagpt.config_checks import validate

    validate(settings("model.sdpa_backend=auto"), 1, cuda=False)
    validate(settings("model.sdpa_backend=cudnn"), 1, cuda=True)
    validate(settings("model.sdpa_backend=flash", "model.doc_mask=true", "model.attention=flash_attn"), 1, cuda=True)


# --- on a GPU -------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _qkv(B=2, H=8, KV=2, T=256, D=64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [
        torch.randn(B, n, T, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for n in (H, KV, KV)
    ]


def _out_and_grads(fn, q, k, v):
    out = fn(q, k, v)
    out.backward(torch.ones_like(out) / out.numel() ** 0.5)
    grads = [x.grad.float().clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    return out.float(), grads


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("doc_mask", [False, True])
def test_flash_attn_matches_sdpa_output_and_grads_on_gpu(doc_mask):
    if not A.flash_attn_available():
        pytest.skip(f"no FlashAttention here: {A.flash_unavailable_reason()}")
    q, k, v = _qkv()
    vis = Visibility.of(packed(2, 256, 5, 0.02).cuda(), eod_id=EOD if doc_mask else None)
    ref, ref_grads = _out_and_grads(lambda *x: causal_attention(*x, "sdpa", vis), q, k, v)
    out, grads = _out_and_grads(lambda *x: causal_attention(*x, "flash_attn", vis), q, k, v)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_cuda
def test_flash_attn_under_torch_compile_on_gpu():
    if not A.flash_attn_available():
        pytest.skip(f"no FlashAttention here: {A.flash_unavailable_reason()}")
    q, k, v = _qkv(T=128)
    eager, eager_grads = _out_and_grads(lambda *x: causal_attention(*x, "flash_attn"), q, k, v)
    compiled = torch.compile(lambda *x: causal_attention(*x, "flash_attn"))
    out, grads = _out_and_grads(compiled, q, k, v)
    torch.testing.assert_close(out, eager, atol=1e-2, rtol=1e-2)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kernel", ["cudnn", "flash", "efficient", "math"])
def test_each_sdpa_kernel_matches_the_eager_maths_on_gpu(kernel):
    q, k, v = _qkv(T=128)
    ref, ref_grads = _out_and_grads(lambda *x: causal_attention(*x, "eager"), q, k, v)
    try:
        out, grads = _out_and_grads(lambda *x: causal_attention(*x, "sdpa", sdpa_backend=kernel), q, k, v)
    except RuntimeError as e:  # this kernel cannot run this call here (e.g. cuDNN and GQA)
        pytest.skip(f"{kernel}: {str(e).splitlines()[0]}")
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("doc_mask", [False, True])
def test_auto_sdpa_kernel_is_measured_on_gpu(doc_mask):
    lines = []
    chosen = resolve_sdpa_backend(
        "auto", "cuda", batch=2, n_head=8, n_kv_head=2, seq_len=512, head_dim=64, doc_mask=doc_mask, log=lines.append
    )
    assert chosen in A.sdpa_candidates(doc_mask) or chosen is None
    assert len(lines) == 1 and "sdpa kernel:" in lines[0]
    print(lines[0])


@pytest.mark.gpu
@needs_cuda
def test_flash_trial_on_gpu():
    if not A.flash_attn_available():
        pytest.skip(f"no FlashAttention here: {A.flash_unavailable_reason()}")
    for doc_mask in (False, True):
        assert A.flash_trial(32, 8, 64, doc_mask) is None
