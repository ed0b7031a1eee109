"""A decoder-only GPT as a plain nn.Module: no collectives, no engine code.

Token + learned position embeddings, pre-norm blocks of causal self-attention
and MLP, a final norm and an output head tied to the token embedding.

Weights are initialised by `init_module_`, one module at a time, from a
generator the caller owns.  That keeps initialisation identical whether the
model is built whole (tests, export) or already sharded by ZeRO-3, where the
engine gathers each module's parameters, runs the same function and
re-partitions (see engine.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from megagpt.model.attention import causal_attention


@dataclass
class GPTConfig:
    vocab_size: int
    max_seq_len: int
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.0
    bias: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    attention: str = "sdpa"  # a concrete backend: flash_attn | sdpa | eager

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.proj.is_residual_proj = True  # scaled init, see init_module_

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H, D = self.cfg.n_head, self.cfg.head_dim
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        p = self.cfg.dropout if self.training else 0.0
        y = causal_attention(q, k, v, self.cfg.attention, dropout_p=p)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)
        return F.dropout(self.proj(y), p, self.training)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.n_embd
        self.fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.proj.is_residual_proj = True
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc(x), approximate="tanh")  # (B, T, hidden)
        return F.dropout(self.proj(h), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied output head

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx: (B, T) token ids. Returns logits (B, T, V), or the mean
        next-token loss (a scalar) when targets (B, T) are given."""
        B, T = idx.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.cfg.max_seq_len}")
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        x = F.dropout(x, self.cfg.dropout, self.training)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    def init_module_(self, module: nn.Module, gen: torch.Generator) -> None:
        """Initialise the parameters a module owns directly (not its children).

        GPT-2 scheme: N(0, init_std) for linear and embedding weights, the
        projections that write into the residual stream scaled by
        1/sqrt(2 n_layer) so the residual variance stays bounded with depth,
        zeros for biases, ones for norm gains.
        """
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            if module is self.lm_head:
                return  # tied to wte, initialised there
            if getattr(module, "is_residual_proj", False):
                std = std / math.sqrt(2 * self.cfg.n_layer)
            _normal_(module.weight, std, gen)
            if module.bias is not None:
                with torch.no_grad():
                    module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            _normal_(module.weight, std, gen)
        elif isinstance(module, nn.LayerNorm):
            with torch.no_grad():
                module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()

    def init_weights(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for module in self.modules():
            self.init_module_(module, gen)

    def num_params(self, exclude_position: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if exclude_position else n


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
