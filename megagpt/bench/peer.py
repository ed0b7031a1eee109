"""The peers' side of `python -m megagpt.bench gpu` (and `bench compile`): a
small train loop written here, run as the Hugging Face Trainer runs a model
(fp32 weights, bf16 autocast, fused AdamW, gradient norm clipped to 1.0) on
random tokens, for transformers' LlamaForCausalLM and torchtitan's Llama 3 "1B".

One row runs in a process of its own (so that its CUDA memory and compile
caches die with it): `python -m megagpt.bench.peer '<spec json>'`, spec as
`megagpt.bench.gpu.peer_spec` builds it; the result is its `BENCH_RESULT` line.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import traceback

from megagpt.bench.jobs import report


def peer_model(spec: dict, device):
    """The peer's model in fp32 on `device`, and (n_params, n_layer, n_head, head_dim)."""
    import torch

    sh = spec["shape"]
    if spec["runner"] == "transformers":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=sh["vocab_size"],
            hidden_size=sh["n_embd"],
            intermediate_size=sh["mlp_hidden"],
            num_hidden_layers=sh["n_layer"],
            num_attention_heads=sh["n_head"],
            num_key_value_heads=sh["n_kv_head"],
            max_position_embeddings=sh["seq_len"],
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            attn_implementation="sdpa",
        )
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    else:
        from torchtitan.models.llama3 import llama3_configs

        model_cfg = llama3_configs["1B"](attn_backend="flex")
        with torch.device("meta"):
            model = model_cfg.build()
        model.to_empty(device=device)
        with torch.no_grad():
            model.init_states(buffer_device=device)
        # torchtitan's "1B" is the llama-1b preset's shape (PRESET_SHAPE): 16 layers, width 2048, 32 heads.
        assert (len(model.layers), model_cfg.dim, model_cfg.vocab_size) == (
            sh["n_layer"],
            sh["n_embd"],
            sh["vocab_size"],
        )
    n_params = sum(p.numel() for p in model.parameters())  # a tied table counted once
    return model, (n_params, sh["n_layer"], sh["n_head"], sh["n_embd"] // sh["n_head"])


def peer_main(spec: dict) -> dict:
    """One peer row: HF Trainer's recipe (fp32 weights, bf16 autocast, fused
    AdamW, grad norm clipped to 1.0) on random tokens; medians after warm-up."""
    import torch

    from megagpt.flops import flops_per_token, peak_flops

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if spec["runner"] == "torchtitan":
        try:
            import torchtitan.models.llama3  # noqa: F401

            imported = "imports"
        except Exception as e:  # noqa: BLE001 - any import failure skips the peer's row, with its traceback
            traceback.print_exc()  # the whole chain, in the job's log
            return {
                "status": "skipped",
                "reason": f"skipped: torchtitan does not import: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}"[:400],
            }
        if not cuda:
            return {
                "status": "skipped",
                "reason": f"skipped: needs CUDA (FlexAttention has no backward on CPU); torchtitan {imported}",
            }
        if spec["smoke"]:
            return {"status": "skipped", "reason": "skipped: torchtitan's 1B has no tiny shape"}
    torch.manual_seed(0)
    model, (n_params, n_layer, n_head, head_dim) = peer_model(spec, device)
    model.train()
    sh = spec["shape"]
    B, T, accum = sh["micro_batch"], sh["seq_len"], sh["grad_accum"]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0, fused=True)
    forward = model
    if spec["compile"]:
        backend = "eager" if spec["smoke"] else "inductor"  # the smoke run traces, without C++ builds
        if spec["runner"] == "torchtitan":  # as torchtitan does: each block, whole graphs
            for block in model.layers.values():
                block.compile(backend=backend, fullgraph=True)
        else:  # as HF Trainer's torch_compile=True does
            forward = torch.compile(model, backend=backend)

    def loss_of(tokens):
        x, y = tokens[:, :-1], tokens[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            if spec["runner"] == "transformers":
                logits = forward(input_ids=x).logits
            else:
                positions = torch.arange(T, device=device).expand(B, T)
                logits = forward(x, positions, model.get_attention_masks(positions))
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    gen = torch.Generator(device=device).manual_seed(0)
    times = []
    for _ in range(spec["steps"]):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(accum):
            tokens = torch.randint(0, sh["vocab_size"], (B, T + 1), device=device, generator=gen)
            (loss_of(tokens) / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    measured = times[spec["warmup"] :]
    step = statistics.median(measured)
    tps = B * T * accum / step
    fpt = flops_per_token(n_params, n_layer, n_head, head_dim, T)
    mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return {
        "status": "ok",
        "tokens_per_sec": tps,
        "mfu": fpt * tps / peak_flops(device),
        "memory_gb": mem,
        "step_time": step,
        "steps_measured": len(measured),
        "params": n_params,
    }


if __name__ == "__main__":  # one peer row: python -m megagpt.bench.peer '<spec json>'
    report(peer_main(json.loads(sys.argv[1])))
