"""A decoder-only Transformer as a plain nn.Module: no collectives, no engine code.

The model families share one skeleton (embeddings, pre-norm blocks of causal
self-attention and MLP, a final norm, an output head); what differs between
them (positions, norm, MLP, the default MLP width) is one row of the table in
families.py, read here:

  gpt2     learned position embeddings, LayerNorm, GELU MLP
  llama    rotary position embeddings (optionally Llama 3.1's frequency
           scaling: model.rope_scaling), RMSNorm, SwiGLU MLP
  mistral  llama's computation, without biases
  qwen2    llama's computation, with biases on q/k/v only
  qwen3    llama's computation, without biases, with RMSNorm on each head of q
           and k and a head size of its own (model.head_dim)

Any family: fused q/k/v with grouped-query attention where n_kv_head < n_head,
embeddings tied to the output head or not (model.tie_embeddings).  The config
(GPTConfig) is in config.py.

Weights are initialised by `init_module_`, one module at a time, from a
generator the caller owns.  That keeps initialisation identical whether the
model is built whole (tests, export) or already sharded by ZeRO-3, where the
engine gathers each module's parameters, runs the same function and
re-partitions (see engine/build.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megagpt.model.attention import Visibility, causal_attention
from megagpt.model.config import GPTConfig
from megagpt.model.layers import KVCache, apply_rope, rms_norm, rope_tables
from megagpt.model.loss import linear_cross_entropy

__all__ = ["GPT", "GPTConfig", "decay_groups"]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        H, KV, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        row = cfg.family_spec
        # One matmul for q (n_head heads), k and v (n_kv_head heads each); biased where the
        # model is, or where the family says (qwen2: here only).
        self.qkv = nn.Linear(cfg.n_embd, (H + 2 * KV) * D, bias=cfg.bias or row.qkv_bias)
        # qwen3: RMSNorm over each head's D features of q and of k (one gain of D each, shared by
        # the heads), before RoPE.
        self.q_norm = rms_norm(D, cfg.norm_eps, False) if row.qk_norm else None
        self.k_norm = rms_norm(D, cfg.norm_eps, False) if row.qk_norm else None
        self.proj = nn.Linear(H * D, cfg.n_embd, bias=cfg.bias)  # H * D: n_embd unless model.head_dim says
        self.proj.is_residual_proj = True  # scaled init, see init_module_

    def forward(self, x: torch.Tensor, vis: Visibility, rope, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV, D = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim
        q, k, v = self.qkv(x).split([H * D, KV * D, KV * D], dim=2)
        q, k = q.view(B, T, H, D), k.view(B, T, KV, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.transpose(1, 2)  # (B, H, T, D)
        k = k.transpose(1, 2)  # (B, KV, T, D)
        v = v.view(B, T, KV, D).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, KV, offset + T, D)
        p = self.cfg.dropout if self.training else 0.0
        y = causal_attention(
            q, k, v, self.cfg.attention, vis, dropout_p=p, sdpa_backend=self.cfg.sdpa_backend
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return F.dropout(self.proj(y), p, self.training)


def _norm(cfg: GPTConfig) -> nn.Module:
    return cfg.family_spec.norm(cfg.n_embd, cfg.norm_eps, cfg.bias)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = _norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = _norm(cfg)
        self.mlp = cfg.family_spec.mlp(cfg.n_embd, cfg.mlp_hidden, cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, vis: Visibility, rope=None, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), vis, rope, cache)
        return x + F.dropout(self.mlp(self.ln_2(x)), self.dropout, self.training)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.learned_positions = cfg.family_spec.learned_positions  # else rotary
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if self.learned_positions:
            self.wpe = nn.Embedding(cfg.max_seq_len, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = _norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """idx: (B, T) token ids. Returns logits (B, T, V), or the mean
        next-token loss (a scalar) when targets (B, T) are given.  With a
        cache, idx continues the positions already in it."""
        B, T = idx.shape
        offset = cache.length if cache is not None else 0
        if offset + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {offset + T} exceeds max_seq_len {self.cfg.max_seq_len}")
        pos = torch.arange(offset, offset + T, device=idx.device)
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.learned_positions:
            x = x + self.wpe(pos)
        else:
            rope = rope_tables(pos, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.llama3_scaling)  # 2 x (T, D)
        x = F.dropout(x, self.cfg.dropout, self.training)
        doc_eod = self.cfg.eod_id if self.cfg.doc_mask and cache is None else None
        vis = Visibility.of(idx, offset, doc_eod)
        k = self.cfg.activation_checkpointing
        for i, block in enumerate(self.blocks):
            if k and self.training and torch.is_grad_enabled() and i % k == 0:
                x = checkpoint(block, x, vis, rope, use_reentrant=False)
            else:
                x = block(x, vis, rope, cache)
        if cache is not None:
            cache.length += T
        x = self.ln_f(x)
        if targets is not None and self.cfg.loss_chunk_tokens:
            # The head and the loss in chunks of tokens, never the whole (B, T, V) logits (loss.py).
            return linear_cross_entropy(
                x, self.lm_head.weight, targets, self.cfg.loss_chunk_tokens, fused=self.cfg.compile
            )
        logits = self.lm_head(x)  # (B, T, V)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    def compile_blocks(self) -> None:
        """torch.compile each transformer block's forward: regional compilation.
        The blocks share one compiled graph (the same code at the same shapes;
        Dynamo lifts each block's parameters as inputs), so compiling takes as
        long for 32 blocks as for one; and what a wrapper does around a block
        (ZeRO-3's gathers, in hooks) stays outside the graph.  The embeddings,
        the final norm and the head's matmuls run eagerly (the chunked loss
        compiles its own elementwise work: loss.py, `fused`)."""
        for block in self.blocks:
            block.forward = torch.compile(block.forward)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        p = self.wte.weight
        return KVCache(
            self.cfg.n_layer,
            batch,
            self.cfg.n_kv_head,
            max_len or self.cfg.max_seq_len,
            self.cfg.head_dim,
            p.device,
            p.dtype,
        )

    def init_module_(self, module: nn.Module, gen: torch.Generator) -> None:
        """Initialise the parameters a module owns directly (not its children).

        Both families: N(0, init_std) for linear and embedding weights (an
        untied output head too), zeros for biases, ones for norm gains.  The
        two projections per block that write into the residual stream
        (attention out, MLP down) are drawn with std init_std / sqrt(2 n_layer):
        each block adds two such terms, so the residual stream's variance grows
        to about 2 n_layer x (init_std^2 / 2 n_layer), bounded for any depth
        (GPT-2 paper, section 2.3; the same rule as Megatron-LM's
        `scaled_init_method`).
        """
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            if module is self.lm_head and self.cfg.tie_embeddings:
                return  # tied to wte, initialised there
            if getattr(module, "is_residual_proj", False):
                std = std / math.sqrt(2 * self.cfg.n_layer)
            _normal_(module.weight, std, gen)
            if module.bias is not None:
                with torch.no_grad():
                    module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            _normal_(module.weight, std, gen)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            with torch.no_grad():
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()

    def init_weights(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for module in self.modules():
            self.init_module_(module, gen)

    def num_params(self, exclude_position: bool = True, matmul_only: bool = False) -> int:
        """Parameters, a tied head counted once, ZeRO-3 partitioned ones at
        their full size.  exclude_position: without a learned position table.
        matmul_only: N of flops.py, those that take part in matmuls: no
        position table, and the token table only where it is the head too."""
        skip = set()
        if (exclude_position or matmul_only) and self.learned_positions:
            skip.add("wpe.weight")
        if matmul_only and not self.cfg.tie_embeddings:
            skip.add("wte.weight")
        return sum(getattr(p, "ds_numel", p.numel()) for name, p in self.named_parameters() if name not in skip)


def _normal_(w: torch.Tensor, std: float, gen: torch.Generator) -> None:
    # Draw on CPU from the caller's generator so the weights do not depend on
    # the device or on how many ranks the model is spread over.
    with torch.no_grad():
        w.copy_(torch.randn(w.shape, generator=gen) * std)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decay the weights of linear and embedding layers,
    not biases or norm gains. Decided by module type, not tensor shape, because
    ZeRO-3 partitioned parameters are flat."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            is_weight = name == "weight" and isinstance(module, (nn.Linear, nn.Embedding))
            (decay if is_weight else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
