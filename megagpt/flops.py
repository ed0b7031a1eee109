"""Model FLOPs per token and peak FLOP/s, for MFU.

Convention (nanoGPT, torchtitan; PaLM appendix B): training FLOPs per token
  6 * N + 12 * L * H * Q * T
N parameters that take part in matmuls (all but the learned position table;
the token table counts only when tied to the output head, where it is a
matmul; GPT.num_params(matmul_only=True)), L layers, H query heads, Q head dim,
T sequence length.  Grouped-query attention changes N (smaller k/v
projections) but not the attention term, which every query head computes in
full.  6N is forward + backward of every matmul; the second term
is the attention scores and weighted sum, counted over the full T x T matrix
(Megatron-LM halves it for the causal mask; we do not).
"""

from __future__ import annotations

import time

import torch

# Dense bf16 tensor-core peak per device, without sparsity (vendor data sheets).
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
}


def flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> float:
    return 6.0 * n_params + 12.0 * n_layer * n_head * head_dim * seq_len


def gpu_peak_flops(device_name: str) -> float | None:
    for key in sorted(GPU_PEAK_BF16, key=len, reverse=True):
        if key in device_name:
            return GPU_PEAK_BF16[key]
    return None


def measure_cpu_peak_flops(size: int = 1024, repeats: int = 5) -> float:
    """fp32 matmul throughput of this process's threads, best of `repeats`."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


def peak_flops(device: torch.device, configured: float | None = None) -> float:
    if configured:
        return float(configured)
    if device.type == "cuda":
        peak = gpu_peak_flops(torch.cuda.get_device_name(device))
        if peak is not None:
            return peak
    return measure_cpu_peak_flops()
