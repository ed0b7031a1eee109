"""Causal self-attention kernels behind one switch.

softmax(Q K^T / sqrt(d)) V with a causal mask, computed by one of:
  flash_attn  FlashAttention (CUDA only, optional extras): FlashAttention 4
              (package flash-attn-4, `flash_attn.cute`, Hopper and Blackwell)
              where it imports, else flash-attn 2 (`flash_attn`); packed
              documents go through their varlen kernels
  sdpa        torch.nn.functional.scaled_dot_product_attention; on CUDA its
              kernel is model.sdpa_backend's (cuDNN, flash, efficient, math;
              `auto`: the faster of cuDNN and flash, timed once at start by
              resolve_sdpa_backend); the model passes it with each call
              (GPTConfig.sdpa_backend), nothing here holds it
  eager       the reference math, written out
`auto` picks the best one available on the device the model runs on.

What a query may see is described once per forward pass by `Visibility`
(visibility.py): causal over the keys in the cache plus the new ones, and with document masking
only the keys of its own document (a packed sequence holds several documents
separated by the end-of-document token).  The SDPA and eager paths get it as a
boolean mask; FlashAttention as cumulative segment lengths (`cu_seqlens`, one
segment per document per row) over the flattened batch: the two describe the
same visibility (tests/test_attention_backends.py checks it).  Grouped-query
attention (fewer key / value heads than query heads) is handled by every
backend: query head h reads key/value head h // (n_head / n_kv_head).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from megagpt.config import ConfigError
from megagpt.model.visibility import Visibility

BACKENDS = ("flash_attn", "sdpa", "eager")


# --- FlashAttention: which implementation -----------------------------------------------

# FlashAttention 4 (flash_attn.cute) has kernels for Hopper (sm90) and Blackwell
# (sm100+); flash-attn 2 for Ampere (sm80) and later.
FA4_MIN_CAPABILITY = (9, 0)
FA2_MIN_CAPABILITY = (8, 0)


def choose_flash_impl(
    device_type: str, capability: tuple[int, int] | None, fa4_imports: bool, fa2_imports: bool
) -> str | None:
    """Which FlashAttention runs `model.attention=flash_attn`: "fa4", "fa2", or
    None (none can run here).  Pure: given the device, its compute capability
    and which packages import."""
    if device_type != "cuda" or capability is None:
        return None
    if fa4_imports and tuple(capability) >= FA4_MIN_CAPABILITY:
        return "fa4"
    if fa2_imports and tuple(capability) >= FA2_MIN_CAPABILITY:
        return "fa2"
    return None


# Imported once per process: name -> (module, "") or (None, why not), and the
# FlashAttention each CUDA device runs.  Pure caches: each entry is a fact that
# cannot change while the process lives (what is installed, a device's compute
# capability), written once by the function that reads it and never set from
# outside, so a call gives the same answer with or without them.  Plain dicts,
# not functools.cache, so torch.compile reads them as constants.
_imported: dict[str, tuple[object | None, str]] = {}
_impl_by_device: dict[int, str | None] = {}


def _import(name: str) -> tuple[object | None, str]:
    if name not in _imported:
        try:
            module = importlib.import_module(name)
            if name == "flash_attn" and not hasattr(module, "flash_attn_varlen_func"):
                # flash-attn-4 alone makes `flash_attn` a namespace package holding only `cute`.
                module, why = None, "flash_attn has no flash_attn_func (only flash-attn-4's flash_attn.cute is here)"
            else:
                why = ""
        except Exception as e:  # noqa: BLE001 - ImportError, or a CUDA library that fails to load
            module, why = None, f"{type(e).__name__}: {e}".splitlines()[0][:300]
        _imported[name] = (module, why)
    return _imported[name]


def fa4_module():
    """flash_attn.cute (FlashAttention 4) or None."""
    return _import("flash_attn.cute")[0]


def fa2_module():
    """flash_attn (FlashAttention 2) or None."""
    return _import("flash_attn")[0]


def flash_impl(device_type: str = "cuda", index: int | None = None) -> str | None:
    """choose_flash_impl for a CUDA device of this process (the current one
    unless `index`), decided once per device."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device() if index is None else index
    if index not in _impl_by_device:
        _impl_by_device[index] = choose_flash_impl(
            "cuda", torch.cuda.get_device_capability(index), fa4_module() is not None, fa2_module() is not None
        )
    return _impl_by_device[index]


def flash_attn_available() -> bool:
    return flash_impl("cuda") is not None


def flash_unavailable_reason() -> str:
    """One line: why neither FlashAttention can run here."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    cap = torch.cuda.get_device_capability()
    return (
        f"compute capability {cap[0]}.{cap[1]}; flash_attn.cute: {_import('flash_attn.cute')[1] or 'imports'}"
        f"; flash_attn: {_import('flash_attn')[1] or 'imports'}"
    )


def resolve_backend(name: str, device_type: str) -> str:
    """Turn `auto` into a concrete backend; reject what cannot run here (ConfigError)."""
    if name == "auto":
        if device_type == "cuda" and flash_attn_available():
            return "flash_attn"
        return "sdpa"
    if name == "flash_attn" and not (device_type == "cuda" and flash_attn_available()):
        raise ConfigError(
            "model.attention=flash_attn needs CUDA and FlashAttention: flash-attn-4 on Hopper/Blackwell "
            '(pip install -e ".[flash4]") or flash-attn 2 (pip install -e ".[flash]"); use sdpa or auto here'
        )
    if name not in BACKENDS:
        raise ConfigError(f"model.attention: unknown backend {name!r}; choose auto or one of {BACKENDS}")
    return name


def flash_trial(
    n_head: int,
    n_kv_head: int,
    head_dim: int,
    doc_mask: bool = False,
    device: torch.device | str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    seq_len: int = 128,
    tolerance: float = 0.05,
) -> str | None:
    """Why FlashAttention cannot train this model here, or None: one forward +
    backward through the run's own path (dense, or varlen with `doc_mask`) at
    the model's head shape on a short batch, its output checked against SDPA's.

    FlashAttention 4 compiles its kernels at the first call; a kernel that
    fails to compile or to run (a CUDA library that does not match) shows here,
    at start, where `auto` can still fall back to SDPA, instead of in the first
    step.  Its kernels are cached by head shape and dtype, not by sequence
    length, so the first step reuses what this compiled."""
    gen = torch.Generator(device=device).manual_seed(0)
    B = 2
    q = torch.randn(B, n_head, seq_len, head_dim, device=device, dtype=dtype, generator=gen)
    k, v = (torch.randn(B, n_kv_head, seq_len, head_dim, device=device, dtype=dtype, generator=gen) for _ in range(2))
    vis = Visibility(seq_len)
    if doc_mask:  # two documents per row, cut at different places
        cut = torch.tensor([[seq_len // 3], [seq_len // 2]], device=device)
        vis.doc = (torch.arange(seq_len, device=device)[None, :] >= cut).long()  # (B, T)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    try:
        out = causal_attention(q, k, v, "flash_attn", vis)
        out.float().square().sum().backward()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - a kernel's compile or launch failure, whatever its type
        return f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
    with torch.no_grad():
        reference = _sdpa(q, k, v, vis, 0.0)
        error = float((out.float() - reference.float()).abs().max())
    if not error <= tolerance:  # NaN too
        return f"its output differs from SDPA's by up to {error:.3g} (more than {tolerance})"
    if any(x.grad is None or not torch.isfinite(x.grad).all() for x in (q, k, v)):
        return "its backward left a missing or non-finite gradient"
    return None


# --- SDPA: which kernel -------------------------------------------------------------------

SDPA_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")
_SDPA_ENUM = {
    "cudnn": "CUDNN_ATTENTION",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


def sdpa_backend_problem(name: str, cuda: bool, doc_mask: bool) -> str | None:
    """Why model.sdpa_backend=`name` cannot run, or None: the one place its
    checks live (config_checks.validate runs them at start, resolve_sdpa_backend
    where the kernel is chosen).  `cuda`: whether the model runs on CUDA;
    `doc_mask`: whether SDPA gets a mask (document masking on an SDPA run)."""
    if name not in SDPA_BACKENDS:
        return f"unknown kernel {name!r}; choose one of {SDPA_BACKENDS}"
    if name != "auto" and not cuda:
        return f"{name} selects a CUDA kernel and training runs on CPU here; leave it auto"
    if name == "flash" and doc_mask:
        return "flash takes no mask, and model.doc_mask=true needs one; use cudnn, efficient or auto"
    return None


def _sdpa_context(name: str | None):
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, _SDPA_ENUM[name])])


def sdpa_candidates(doc_mask: bool) -> tuple[str, ...]:
    """The kernels `auto` times.  SDPA's flash kernels take no mask, so with
    document masking (a boolean mask) the memory-efficient kernel stands in."""
    return ("cudnn", "efficient") if doc_mask else ("cudnn", "flash")


def choose_sdpa_backend(times: dict[str, float | None]) -> str | None:
    """The fastest kernel given measured seconds per call (None: failed to
    run); None when none ran.  Ties go to the first listed."""
    ran = [(t, i, name) for i, (name, t) in enumerate(times.items()) if t is not None and math.isfinite(t)]
    return min(ran)[2] if ran else None


def time_sdpa_backends(
    batch: int,
    n_head: int,
    n_kv_head: int,
    seq_len: int,
    head_dim: int,
    candidates: tuple[str, ...] = ("cudnn", "flash"),
    doc_mask: bool = False,
    device: torch.device | str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    warmup: int = 2,
    iters: int = 5,
) -> tuple[dict[str, float | None], dict[str, str]]:
    """Median seconds of one forward + backward of the model's SDPA call at this
    shape for each kernel: ({kernel: seconds or None}, {kernel: why it failed})."""
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, n_head, seq_len, head_dim, device=device, dtype=dtype, generator=gen)
    k = torch.randn(batch, n_kv_head, seq_len, head_dim, device=device, dtype=dtype, generator=gen)
    v = torch.randn_like(k)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    # Document masking reaches SDPA as a boolean mask; the causal one takes the same kernel path.
    vis = Visibility(seq_len)
    if doc_mask:
        vis.doc = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    cuda = torch.device(device).type == "cuda"
    times, errors = {}, {}
    for name in candidates:
        try:
            samples = []
            for i in range(warmup + iters):
                if cuda:
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                with _sdpa_context(name):
                    out = _sdpa(q, k, v, vis, 0.0)
                out.backward(torch.ones_like(out))
                if cuda:
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    samples.append(time.perf_counter() - t0)
            times[name] = statistics.median(samples)
        except RuntimeError as e:  # "No available kernel", or a kernel's own refusal
            times[name] = None
            errors[name] = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        q.grad = k.grad = v.grad = None
    return times, errors


def resolve_sdpa_backend(
    name: str,
    device_type: str,
    *,
    batch: int,
    n_head: int,
    n_kv_head: int,
    seq_len: int,
    head_dim: int,
    doc_mask: bool = False,
    log: Callable[[str], None] | None = None,
) -> str | None:
    """model.sdpa_backend -> the kernel the model's SDPA calls use
    (GPTConfig.sdpa_backend; None: torch's choice).  What cannot run is a
    ConfigError (sdpa_backend_problem; config_checks rejects it first).  CPU:
    auto is ignored (None).  CUDA: an explicit kernel is used as given; auto
    times cuDNN against flash (efficient with document masking) at the run's
    shape in bf16, says both through `log` and picks the faster."""
    problem = sdpa_backend_problem(name, device_type == "cuda", doc_mask)
    if problem is not None:
        raise ConfigError(f"model.sdpa_backend: {problem}")
    if device_type != "cuda":
        return None
    if name != "auto":
        return name
    candidates = sdpa_candidates(doc_mask)
    times, errors = time_sdpa_backends(batch, n_head, n_kv_head, seq_len, head_dim, candidates, doc_mask)
    chosen = choose_sdpa_backend(times)
    if log is not None:
        parts = [
            f"{k} {t * 1e3:.2f} ms" if t is not None else f"{k} failed ({errors.get(k, '?')})" for k, t in times.items()
        ]
        log(
            f"sdpa kernel: {chosen or 'torch default'} (auto; forward+backward at batch {batch}, {n_head} heads "
            f"({n_kv_head} key/value), seq {seq_len}, head dim {head_dim}, bf16: {', '.join(parts)})"
        )
    return chosen


# --- The kernels --------------------------------------------------------------------------


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str,
    vis: Visibility | None = None,
    dropout_p: float = 0.0,
    sdpa_backend: str = "auto",
) -> torch.Tensor:
    """q: (B, H, T, D); k, v: (B, KV, S, D) with H % KV == 0 and S = offset + T.
    Returns (B, H, T, D).  `sdpa_backend`: SDPA's kernel on CUDA (one of
    SDPA_BACKENDS; auto: torch's own choice), read at trace time under
    torch.compile; CPU tensors always get torch's choice."""
    vis = vis or Visibility(q.size(-2))
    if backend == "sdpa":
        kernel = sdpa_backend if q.device.type == "cuda" and sdpa_backend != "auto" else None
        if kernel == "flash" and not vis.plain_causal and vis.mask(q.device) is not None:
            kernel = None  # SDPA's flash kernels take no mask (a cache's prefill): torch's choice
        if kernel is None:
            return _sdpa(q, k, v, vis, dropout_p)
        with _sdpa_context(kernel):
            return _sdpa(q, k, v, vis, dropout_p)
    if backend == "eager":
        if k.size(1) != q.size(1):
            rep = q.size(1) // k.size(1)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, T, S)
        mask = vis.mask(q.device)
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        att = att.softmax(dim=-1)
        if dropout_p > 0:
            att = F.dropout(att, p=dropout_p)
        return att @ v
    if backend == "flash_attn":
        return _flash(q, k, v, vis, dropout_p)
    raise ValueError(f"unknown attention backend {backend!r}")


def _sdpa(q, k, v, vis: Visibility, dropout_p: float) -> torch.Tensor:
    gqa = k.size(1) != q.size(1)
    if vis.plain_causal:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=vis.mask(q.device), dropout_p=dropout_p, enable_gqa=gqa)


def _flash(q, k, v, vis: Visibility, dropout_p: float) -> torch.Tensor:
    impl = flash_impl(q.device.type, q.device.index)
    if impl == "fa4" and dropout_p > 0:
        # FlashAttention 4 has no dropout: flash-attn 2 where it is here, else SDPA (the same maths).
        impl = "fa2" if fa2_module() is not None else None
        if impl is None:
            return _sdpa(q, k, v, vis, dropout_p)
    if impl is None:
        raise RuntimeError(f"model.attention=flash_attn cannot run here: {flash_unavailable_reason()}")
    # FlashAttention wants (B, T, H, D) in fp16/bf16; its causal mask is aligned
    # to the end of the keys, which is what a cache needs.
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    B, T, H, D = q.shape
    if vis.doc is None:
        out = (
            _fa4_dense(q, k, v)
            if impl == "fa4"
            else fa2_module().flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)
        )
        return out.transpose(1, 2)
    cu, longest = vis.varlen()
    q, k, v = q.reshape(B * T, H, D), k.reshape(B * T, k.size(2), D), v.reshape(B * T, v.size(2), D)
    if impl == "fa4":
        out = _fa4_varlen(q, k, v, cu, longest)
    else:
        out = fa2_module().flash_attn_varlen_func(
            q,
            k,
            v,
            cu_seqlens_q=cu,
            cu_seqlens_k=cu,
            max_seqlen_q=longest,
            max_seqlen_k=longest,
            dropout_p=dropout_p,
            causal=True,
        )
    return out.reshape(B, T, H, D).transpose(1, 2)


def _first(result):
    # flash_attn.cute's functions return (out, lse).
    return result[0] if isinstance(result, tuple) else result


# FlashAttention 4's autograd Functions call CuTe DSL kernels that torch.compile
# cannot trace: under compile, each call is a graph break (the rest of the block
# still compiles).  Measured on no GPU yet: see tests/test_attention_backends.py.
@torch.compiler.disable
def _fa4_dense(q, k, v):
    return _first(fa4_module().flash_attn_func(q, k, v, causal=True))


@torch.compiler.disable
def _fa4_varlen(q, k, v, cu, longest):
    return _first(
        fa4_module().flash_attn_varlen_func(
            q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest, causal=True
        )
    )
