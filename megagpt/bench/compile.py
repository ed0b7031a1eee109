"""`python -m megagpt.bench compile`: what torch.compile costs at start and
gives per step, megagpt's compiled blocks beside whole-model compilation and
transformers' LlamaForCausalLM compiled whole (HF Trainer's torch_compile).

    python -m megagpt.bench compile [--layers 4,16] [--width 128] [--seq 64] [--batch 2] [--json FILE]

Each row runs in a fresh process with an empty inductor cache (a cold start,
as on a new machine): one model of the llama family, fp32, AdamW, random
tokens; `first step` is the first forward + backward + optimizer step (the
compile included), `step` the median of the next five.  `graphs` is
Dynamo's count of distinct graphs.  On CPU the compile time is inductor's C++
path; on CUDA, Triton's.  The rows:

  megagpt, eager              GPT as the engine gets it, not compiled
  megagpt, compiled blocks    GPT.compile_blocks (what model.compile does)
  megagpt, compiled whole     torch.compile(GPT): the previous way (engine.compile)
  transformers, compiled whole  LlamaForCausalLM at the same shape, torch.compile
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from megagpt.bench.jobs import last_line, report, result_in

ROWS = [
    ("megagpt, eager", "megagpt", "eager"),
    ("megagpt, compiled blocks", "megagpt", "blocks"),
    ("megagpt, compiled whole", "megagpt", "whole"),
    ("transformers, compiled whole", "transformers", "whole"),
]


def _model(runner: str, layers: int, width: int, seq: int):
    """The row's model (fp32, CPU) and its loss function; transformers' is the gpu bench's peer."""
    vocab, heads = 512, max(1, width // 32)
    if runner == "megagpt":
        from megagpt.model.gpt import GPT, GPTConfig

        model = GPT(
            GPTConfig(
                vocab_size=vocab,
                max_seq_len=seq,
                n_layer=layers,
                n_head=heads,
                n_kv_head=heads,
                n_embd=width,
                mlp_hidden=4 * width,
                family="llama",
            )
        )
        return model, lambda x, y: model(x, y)
    from megagpt.bench.peer import peer_model

    shape = dict(
        vocab_size=vocab, n_embd=width, mlp_hidden=4 * width, n_layer=layers, n_head=heads, n_kv_head=heads, seq_len=seq
    )
    model, _ = peer_model({"runner": "transformers", "shape": shape}, "cpu")
    return model, lambda x, y: model(input_ids=x, labels=y).loss


def row_main(spec: dict) -> dict:
    """One row, in this process (a child of the bench)."""
    import torch
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model, loss_of = _model(spec["runner"], spec["layers"], spec["width"], spec["seq"])
    if spec["mode"] == "blocks":
        model.compile_blocks()
    elif spec["mode"] == "whole":
        compiled = torch.compile(model)
        runner = spec["runner"]
        loss_of = (
            (lambda x, y: compiled(x, y))
            if runner == "megagpt"
            else (lambda x, y: compiled(input_ids=x, labels=y).loss)
        )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, 512, (spec["batch"], spec["seq"] + 1))
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        loss_of(tokens[:, :-1], tokens[:, 1:] if spec["runner"] == "megagpt" else tokens[:, :-1]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {
        "first_step_s": times[0],
        "step_ms": 1e3 * statistics.median(times[1:]),
        "graphs": counters["stats"]["unique_graphs"],
    }


def run_row(spec: dict) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        r = subprocess.run(
            [sys.executable, "-m", "megagpt.bench.compile", json.dumps(spec)],
            capture_output=True,
            text=True,
            env=env,
            timeout=1200,
        )
    result = result_in(r.stdout)
    return result if result is not None else {"error": last_line(r.stderr) or "no output"}


def bench_compile(args) -> dict:
    layers = [int(x) for x in str(args.layers).split(",")]
    print(f"{'row':<32} {'layers':>6} {'first step':>11} {'step':>10} {'graphs':>7}", flush=True)
    rows = []
    for n in layers:
        for label, runner, mode in ROWS:
            spec = {
                "runner": runner,
                "mode": mode,
                "layers": n,
                "width": args.width,
                "seq": args.seq,
                "batch": args.batch,
            }
            r = dict(label=label, **spec, **run_row(spec))
            rows.append(r)
            if "error" in r:
                print(f"{label:<32} {n:>6} error: {r['error']}", flush=True)
            else:
                print(
                    f"{label:<32} {n:>6} {r['first_step_s']:>9.1f} s {r['step_ms']:>7.1f} ms {r['graphs']:>7}",
                    flush=True,
                )
    return {"rows": rows}


def add_parser(sub) -> None:
    p = sub.add_parser("compile", help="start-up cost and step time of compiled blocks vs whole-model compile")
    p.add_argument("--layers", default="4,16", help="comma-separated depths (default 4,16)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--json", help="also write the figures to this file")
    p.set_defaults(run=bench_compile)


if __name__ == "__main__":  # one row, in a child process: python -m megagpt.bench.compile SPEC
    report(row_main(json.loads(sys.argv[1])))
