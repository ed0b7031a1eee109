"""`python -m megagpt.bench train`: megagpt's training step against
transformers' GPT2LMHeadModel on CPU, one process, fp32, same shape.

Each variant is a full step (forward, loss, backward, AdamW step, zero grad)
on the same batch; variants are timed in interleaved rounds so that machine
noise hits them alike, and each figure is the median step time.  The rows
add one change at a time, so the table shows what each contributes:

  GPT2LMHeadModel (sdpa) + torch AdamW      the peer, as its users run it
  megagpt, eager attention, AdamW foreach   the same model written plainly
  megagpt, SDPA                             + fused attention kernel
  megagpt, SDPA, fused AdamW                + one fused optimizer kernel
  megagpt, SDPA, fused AdamW, compiled      + model.compile: each block compiled (inductor)
"""

from __future__ import annotations

import statistics
import time


def _peer(shape: dict, seed: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=shape["vocab"],
        n_positions=shape["seq"],
        n_embd=shape["width"],
        n_layer=shape["layers"],
        n_head=shape["heads"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg, attn_implementation="sdpa") if _accepts_attn(GPT2LMHeadModel) else GPT2LMHeadModel(cfg)
    model.config._attn_implementation = "sdpa"
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(x, y):
        loss = model(input_ids=x, labels=x).loss  # shifts labels inside: the same next-token loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, sum(p.numel() for p in model.parameters())


def _accepts_attn(cls) -> bool:
    import inspect

    return "attn_implementation" in inspect.signature(cls.__init__).parameters


def _megagpt(shape: dict, seed: int, attention: str, fused: bool, compiled: bool):
    import torch

    from megagpt.model.gpt import GPT, GPTConfig

    model = GPT(
        GPTConfig(
            vocab_size=shape["vocab"],
            max_seq_len=shape["seq"],
            family="gpt2",
            n_layer=shape["layers"],
            n_head=shape["heads"],
            n_embd=shape["width"],
            attention=attention,
        )
    )
    model.init_weights(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, foreach=None if fused else True)
    if compiled:
        model.compile_blocks()  # what model.compile does
    fwd = model

    def step(x, y):
        loss = fwd(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, sum(p.numel() for p in model.parameters())


def bench_train(args) -> dict:
    import torch

    from megagpt.flops import flops_per_token, measure_cpu_peak_flops

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = {
        "layers": args.layers,
        "heads": args.heads,
        "width": args.width,
        "seq": args.seq_len,
        "vocab": args.vocab,
        "batch": args.batch,
    }
    variants = {
        "GPT2LMHeadModel (sdpa) + torch AdamW": lambda: _peer(shape, 0),
        "megagpt, eager attention, AdamW foreach": lambda: _megagpt(shape, 0, "eager", False, False),
        "megagpt, SDPA, AdamW foreach": lambda: _megagpt(shape, 0, "sdpa", False, False),
        "megagpt, SDPA, fused AdamW": lambda: _megagpt(shape, 0, "sdpa", True, False),
    }
    if not args.no_compile:
        variants["megagpt, SDPA, fused AdamW, compiled blocks"] = lambda: _megagpt(shape, 0, "sdpa", True, True)
    gen = torch.Generator().manual_seed(0)
    # The peer shifts labels inside; megagpt takes inputs/targets: both see seq tokens and predict seq - 1.
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=gen)
    steps, n_params = {}, {}
    for name, make in variants.items():
        steps[name], n_params[name] = make()
        for _ in range(args.warmup):  # first calls: allocation, compilation
            steps[name](x, None)
    times: dict[str, list[float]] = {name: [] for name in variants}
    peaks = []
    for _ in range(args.rounds):
        peaks.append(measure_cpu_peak_flops(repeats=3))  # under the same load as the steps
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(x, None)
            times[name].append((time.perf_counter() - t0) / args.steps)
    peak = statistics.median(peaks)
    n = n_params["megagpt, SDPA, fused AdamW"] - args.seq_len * args.width  # without position embeddings
    fpt = flops_per_token(n, args.layers, args.heads, args.width // args.heads, args.seq_len)
    tokens = args.batch * (args.seq_len - 1)
    peer = statistics.median(times["GPT2LMHeadModel (sdpa) + torch AdamW"])
    rows = []
    print(
        f"one process, fp32, {torch.get_num_threads()} threads; {args.layers} layers, {args.heads} heads, "
        f"width {args.width}, seq {args.seq_len}, batch {args.batch}, vocab {args.vocab}; "
        f"medians of {args.rounds} interleaved rounds x {args.steps} steps"
    )
    print(f"{'variant':<44} {'step ms':>9} {'tokens/s':>10} {'MFU':>7} {'vs peer':>8}")
    for name, ts in times.items():
        med = statistics.median(ts)
        tps = tokens / med
        row = {
            "variant": name,
            "step_sec": med,
            "tokens_per_sec": tps,
            "mfu": fpt * tps / peak,
            "speedup_vs_peer": peer / med,
            "params": n_params[name],
        }
        rows.append(row)
        print(f"{name:<44} {med * 1e3:>9.1f} {tps:>10,.0f} {row['mfu']:>6.1%} {row['speedup_vs_peer']:>7.2f}x")
    best = max(rows[1:], key=lambda r: r["speedup_vs_peer"])
    print(
        f"best megagpt variant: {best['variant']} at {best['speedup_vs_peer']:.2f}x GPT2LMHeadModel "
        f"(CPU fp32 matmul peak measured at {peak / 1e9:.1f} GFLOP/s)"
    )
    return {
        "shape": shape,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "steps": args.steps,
        "peak_flops": peak,
        "rows": rows,
        "best": best["variant"],
        "best_speedup": best["speedup_vs_peer"],
    }


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="megagpt's training step vs transformers' GPT2LMHeadModel on CPU")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled variant")
    p.add_argument("--json", help="also write the figures to this file")
    p.set_defaults(run=bench_train)
