"""Building blocks the model families share or swap (see families.py): norms,
MLPs, rotary position embeddings, and the key/value cache used in generation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def layer_norm(dim: int, eps: float, bias: bool) -> nn.Module:
    """GPT-2's norm: LayerNorm, with a bias unless the model has none."""
    return nn.LayerNorm(dim, eps=eps, bias=bias)


def rms_norm(dim: int, eps: float, bias: bool) -> nn.Module:
    """Llama's norm: RMSNorm, a gain and no bias whatever `bias` says."""
    return nn.RMSNorm(dim, eps=eps)


class GeluMLP(nn.Module):
    """GPT-2: Linear -> GELU (tanh approximation) -> Linear."""

    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)
        self.proj.is_residual_proj = True  # scaled init, see GPT.init_module_

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))  # (B, T, dim)


class SwiGLU(nn.Module):
    """Llama: down(silu(gate(x)) * up(x)); gate and up are one fused matmul,
    rows [0, hidden) the gate and [hidden, 2 hidden) the up projection."""

    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.hidden = hidden
        self.fc = nn.Linear(dim, 2 * hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)
        self.proj.is_residual_proj = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).split(self.hidden, dim=-1)  # 2 x (B, T, hidden)
        return self.proj(F.silu(gate) * up)


@dataclass(frozen=True)
class Llama3Scaling:
    """Llama 3.1's RoPE frequency scaling (config.json: rope_scaling with
    rope_type llama3), which stretches a model pretrained on
    `original_max_seq_len` positions to a longer context.  Frequencies whose
    wavelength fits original_max_seq_len / high_freq_factor times into the
    original context keep their value; those with a wavelength longer than
    original_max_seq_len / low_freq_factor are divided by `factor`; in between
    they blend linearly in original_max_seq_len / wavelength.  The formula of
    Meta's Llama 3.1 reference code, as transformers computes it
    (modeling_rope_utils, rope_type llama3)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_seq_len: int

    def scale(self, inv_freq: torch.Tensor) -> torch.Tensor:
        """inv_freq (head_dim / 2,) fp32 -> the scaled frequencies, same shape."""
        wavelen = 2 * math.pi / inv_freq
        slowed = inv_freq / self.factor
        # 0 at the long-wavelength bound, 1 at the short one (linear in 1 / wavelen).
        t = (self.original_max_seq_len / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        blended = (1 - t) * inv_freq / self.factor + t * inv_freq
        short = wavelen < self.original_max_seq_len / self.high_freq_factor
        long = wavelen > self.original_max_seq_len / self.low_freq_factor
        return torch.where(short, inv_freq, torch.where(long, slowed, blended))


def rope_inv_freq(
    head_dim: int, theta: float, scaling: Llama3Scaling | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """The rotation frequencies (head_dim / 2,) in fp32: theta^(-2i / head_dim),
    then scaled where the model says so."""
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim  # (head_dim / 2,)
    inv_freq = 1.0 / theta**exponents
    return scaling.scale(inv_freq) if scaling is not None else inv_freq


def rope_tables(
    positions: torch.Tensor, head_dim: int, theta: float, scaling: Llama3Scaling | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, head_dim) in fp32 for integer positions (T,).

    The "rotate half" layout: frequency i rotates the pair (i, i + head_dim/2),
    as Hugging Face's Llama does, so weights map across without permutation.
    Computed each call in fp32 (T x head_dim/2 products: negligible) so that
    reduced-precision training never rounds the angles."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, positions.device)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, head_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, head_dim) rotated by the tables of its T positions."""
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class KVCache:
    """Keys and values of the positions already processed, per layer, so that
    each generated token costs one position of compute.

    Preallocated (B, n_kv_head, max_len, head_dim) per layer; `length` is how
    many positions are filled.  The model advances it after each forward."""

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        shape = (batch, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, KV, T, D) after the filled positions; return all keys
        and values so far, (B, KV, length + T, D)."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"key/value cache holds {self.max_len} positions; {end} needed")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
