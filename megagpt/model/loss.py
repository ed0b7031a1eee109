"""The output head and its cross-entropy without the full logits (`model.loss_chunk_tokens`).

The plain loss (GPT.forward with model.loss_chunk_tokens=0) computes the
(tokens, vocab) logits in one matmul, upcasts them to fp32 and calls
F.cross_entropy, which keeps its fp32 log-probabilities for backward: for
llama-1b's 8 x 2048 tokens and 128256-token vocabulary that is 4.2 GB of bf16
logits, 8.4 GB of fp32 logits and 8.4 GB saved, and as much again for their
gradient in backward.

`linear_cross_entropy` computes the same loss over chunks of at most
`chunk_tokens` rows, and, in forward, the gradients with respect to the hidden
states and the head's weight (as fused linear-cross-entropy kernels do): for
each chunk, its logits (hidden @ weight.T, in the inputs' dtype, then fp32),
their log-softmax, the chunk's summed loss, and the gradient of the mean loss
with respect to the logits, (softmax - onehot(target)) / count, which is
multiplied into the two gradients at once and dropped.  So no chunk's logits
outlive it and backward does no matmul at all: it scales the two saved
gradients by the incoming gradient (1 / accumulation steps, a loss scale).

  saved for backward   the hidden states' gradient (tokens, C) and the
                       weight's (V, C), in the inputs' dtypes (fp16: fp32):
                       what backward would have to produce anyway
  transient            one chunk's fp32 logits and log-probabilities
                       (8 bytes x chunk x V), its gradient in the inputs' dtype,
                       the fp32 accumulator of the weight's gradient (V, C) and,
                       for bf16/fp16, one chunk's product (V, C) before it is
                       added (a matmul with an fp32 output, torch.mm(...,
                       out_dtype=torch.float32) on CUDA, would also round once
                       less; not used: untested here)
  cost                 the plain loss's three matmuls (logits, both gradients)
                       and the same elementwise work; no recomputation.  Fused
                       (`fused`, with model.compile), that work is one compiled
                       function per chunk instead of about six passes over the
                       chunk's fp32 logits

Exactness: the loss is F.cross_entropy's (log_softmax, then nll_loss's sum,
divided by the count of target tokens; targets equal to `ignore_index`,
F.cross_entropy's default -100, count for nothing), and the logits' gradient
is log_softmax's backward written out (exp(log p) x 1/count, minus 1/count at
the target).  With one chunk covering every token the loss is bit-identical to
the plain path on CPU; across chunks only the order of the sums differs (fp32
rounding).  The loss and, for bf16/fp16 inputs, the weight's gradient are
accumulated in fp32 across chunks; the gradients are returned in the inputs'
dtypes.  fp16 inputs (deepspeed.precision=fp16) keep fp32 gradients of the
summed loss until backward, which applies 1/count with the loss scale: scaled
by 1/count first, a logit's gradient would underflow fp16 (as the plain path's
does not: it scales before it casts).

ZeRO-3: the weight must be gathered while this runs.  The head's module never
runs here (its weight is read as a tensor), so the engine registers the weight
as an external parameter of the model's root module (engine.build_engine):
ZeRO-3 then gathers it for the model's forward and backward.  (DeepSpeed's
parameter getter registers it by itself on first access in an eager forward,
but not while torch.compile traces the model.)  Backward returns
the weight's dense gradient; autograd accumulates it into the parameter (tied:
together with the embedding's), where ZeRO-3's gradient hooks reduce it as any
other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# F.cross_entropy's default, which the plain loss uses.
IGNORE_INDEX = -100


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int,
    ignore_index: int = IGNORE_INDEX,
    fused: bool = False,
) -> torch.Tensor:
    """F.cross_entropy((hidden @ weight.T).float(), targets) (the mean over the
    target tokens not equal to ignore_index), chunk_tokens rows at a time.
    hidden (..., C), weight (V, C), targets (...) int64.  Returns an fp32 scalar.
    `fused`: each chunk's elementwise work (log-softmax, loss, the logits'
    gradient) is one torch.compile'd function (model.compile), so the fp32
    logits are not written out and read back pass after pass."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    h = hidden.reshape(-1, hidden.size(-1))
    t = targets.reshape(-1)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, t, chunk_tokens, ignore_index, fused)
    with torch.no_grad():
        return _loss_and_grads(h, weight, t, chunk_tokens, ignore_index, False, False, fused)[0]


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and both gradients; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens, ignore_index, fused):
        loss, grad_hidden, grad_weight, deferred = _loss_and_grads(
            hidden, weight, targets, chunk_tokens, ignore_index, ctx.needs_input_grad[0], ctx.needs_input_grad[1], fused
        )
        ctx.save_for_backward(grad_hidden, grad_weight, deferred)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, deferred = ctx.saved_tensors
        if deferred is not None:  # fp16: the fp32 gradients still lack the 1/count
            grad_loss = grad_loss * deferred
        # In place: the saved gradients are used once.  (A second backward through
        # the same graph fails autograd's version check instead of scaling twice.)
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_loss).to(ctx.dtypes[0])
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(ctx.dtypes[1])
        return grad_hidden, grad_weight, None, None, None, None


def _chunk_terms(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    scale: torch.Tensor | float,
    ignore_index: int,
    out_dtype: torch.dtype | None,
):
    """One chunk's summed loss (fp32) and the gradient of the loss w.r.t. its logits in
    `out_dtype` (None: no gradient), the logits' rows scaled by `scale` (1/count).  Eager, or
    compiled whole by torch.compile (`_fused`), which fuses the passes over the logits."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (n, V) fp32
    loss = F.nll_loss(logp, targets, ignore_index=ignore_index, reduction="sum")
    if out_dtype is None:
        return loss, None
    # log_softmax's backward for nll_loss's gradient (-1/count at each valid target), in
    # place: softmax x 1/count, minus 1/count at the target; rows of ignored targets are zero.
    row_scale = (valid * scale)[:, None]  # (n, 1): 1/count, or 0 where ignored
    g = logp.exp_().mul_(row_scale)
    g.scatter_add_(1, torch.where(valid, targets, 0)[:, None], -row_scale)
    return loss, g.to(out_dtype)


_fused_chunk_terms = None  # torch.compile(_chunk_terms), made at first use


def _fused():
    global _fused_chunk_terms
    if _fused_chunk_terms is None:
        _fused_chunk_terms = torch.compile(_chunk_terms)
    return _fused_chunk_terms


def _loss_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int,
    ignore_index: int,
    need_hidden: bool,
    need_weight: bool,
    fused: bool = False,
):
    """(the mean loss, d loss / d hidden or None, d loss / d weight or None, deferred), one chunk of
    rows at a time.  hidden (N, C), weight (V, C), targets (N,).  The gradients are in the inputs'
    dtypes, except for fp16 inputs: fp16 has 5 exponent bits, and a logit's gradient
    (softmax - onehot) / count underflows there before backward applies the loss scale, so for fp16
    the gradients are of the summed loss, in fp32, and `deferred` is the 1/count backward applies
    (None otherwise)."""
    n = hidden.size(0)
    valid = targets != ignore_index
    count = valid.sum().float()  # nll_loss's total weight
    scale = count.reciprocal()  # d mean / d (a token's loss)
    defer = hidden.dtype == torch.float16
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = None
    if need_hidden:
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32 if defer else hidden.dtype, device=hidden.device)
    grad_weight = None  # fp32 accumulator (V, C)
    need_grad = need_hidden or need_weight
    terms = _fused() if fused and need_grad else _chunk_terms
    for start in range(0, n, chunk_tokens):
        end = min(start + chunk_tokens, n)
        h, t, v = hidden[start:end], targets[start:end], valid[start:end]
        chunk_loss, g = terms(
            torch.mm(h, weight.t()), t, v, 1.0 if defer else scale, ignore_index, hidden.dtype if need_grad else None
        )
        loss = loss + chunk_loss
        if not need_grad:
            continue
        if need_hidden:
            if defer:
                grad_hidden[start:end] = torch.mm(g, weight)
            else:
                torch.mm(g, weight, out=grad_hidden[start:end])
        if need_weight:
            if grad_weight is None:
                grad_weight = torch.mm(g.t(), h).float()  # fp32 inputs: no copy
            elif grad_weight.dtype == g.dtype:
                grad_weight.addmm_(g.t(), h)
            else:  # bf16 / fp16: each chunk's product, accumulated in fp32
                grad_weight.add_(torch.mm(g.t(), h))
        del g  # before the next chunk's logits
    if need_weight and grad_weight is None:  # no rows at all
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    if grad_weight is not None and not defer:
        grad_weight = grad_weight.to(weight.dtype)
    return loss / count, grad_hidden, grad_weight, (scale if defer and (need_hidden or need_weight) else None)
