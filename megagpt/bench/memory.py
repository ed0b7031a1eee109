"""`python -m megagpt.bench memory`: per-rank memory of ZeRO-0 and ZeRO-3 as ranks grow.

    python -m megagpt.bench memory [--n-layer 8 --n-embd 1024 --n-head 16] [--ranks 1 2 4]
                                   [--stages 0 3] [--seq-len 64 --micro-batch 2 --steps 2]

For each ZeRO stage and number of ranks, a real job under torchrun
(`python -m torch.distributed.run --nproc_per_node=W -m megagpt.bench.memory
--worker ...`) builds the engine with megagpt's own functions (the Hydra
config composed from conf/, engine.deepspeed_config, build_model_config,
build_engine: the model built inside deepspeed.zero.Init, torch AdamW),
runs a few training steps on random tokens (seq len and batch tiny: this
measures model state, not activations) and every rank reports:

    params     bytes of parameters this rank holds: ZeRO-3, its partition
               (each parameter's ds_tensor) plus the full copies of the small
               parameters DeepSpeed keeps whole (below
               stage3_param_persistence_threshold); ZeRO-0, the whole model
    grads      bytes of gradients held after backward: ZeRO-3, the partitioned
               gradient buffer; ZeRO-0, every parameter's .grad
    optimizer  bytes of the torch optimizer's state on this rank (AdamW:
               exp_avg, exp_avg_sq; the inner optimizer DeepSpeed steps)
    master     optimizer parameters that are separate copies of the model's
               (fp32 master weights under bf16; none in fp32 on CPU)
    peak RSS   resource.getrusage(RUSAGE_SELF).ru_maxrss: everything, the
               Python/torch/DeepSpeed runtime and transient buffers included;
               `baseline` is the RSS before the model is built

4 processes on 2 cores are slow but fine for a memory measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

MB = 2**20


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _unique_params(model) -> list:
    seen, out = set(), []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _storage(t) -> int:
    return t.untyped_storage().data_ptr()


def measure_state(model, optimizer, engine, stage: int) -> dict:
    """Bytes of parameters, optimizer state and master copies this rank holds."""
    params = _unique_params(model)
    if stage == 3:
        partition = sum(_nbytes(p.ds_tensor) for p in params)
        persistent = sum(p.ds_numel * p.ds_tensor.element_size() for p in params if getattr(p, "ds_persist", False))
        full = sum(p.ds_numel * p.ds_tensor.element_size() for p in params)
        storages = {_storage(p.ds_tensor) for p in params}
    else:
        partition, persistent = sum(_nbytes(p) for p in params), 0
        full = partition
        storages = {_storage(p) for p in params}
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    state_bytes = 0
    for state in inner.state.values():
        for v in state.values():
            if hasattr(v, "numel") and v.dim() > 0:
                state_bytes += _nbytes(v)
    opt_params = [p for g in inner.param_groups for p in g["params"]]
    master = sum(_nbytes(p) for p in opt_params if _storage(p) not in storages)
    return {
        "param_bytes": partition + persistent,
        "param_partition_bytes": partition,
        "param_persistent_bytes": persistent,
        "model_param_bytes": full,
        "n_params": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        "optimizer_state_bytes": state_bytes,
        "master_param_bytes": master,
        "inner_optimizer": type(inner).__name__,
        "inner_is_megagpt_optimizer": inner is optimizer,
    }


def grad_bytes(model, engine, stage: int) -> int:
    if stage == 3:
        buf = getattr(engine.optimizer, "grad_partitions_flat_buffer", None)
        if buf is not None:
            return _nbytes(buf)
        return sum(_nbytes(g.grad) for g in engine.optimizer.fp32_partitioned_groups_flat if g.grad is not None)
    return sum(_nbytes(p.grad) for p in _unique_params(model) if p.grad is not None)


class CommCounter:
    """Counts the bytes of the collectives torch.distributed is asked for (DeepSpeed
    calls them through the module, so wrapping its functions sees every one):
    all_gather: the gathered (full) tensor; reduce_scatter: the full input that is
    reduced; all_reduce and broadcast: the tensor."""

    KINDS = {
        "all_gather_into_tensor": ("all_gather", 0),
        "_all_gather_base": ("all_gather", 0),
        "all_gather": ("all_gather", 0),
        "reduce_scatter_tensor": ("reduce_scatter", 1),
        "_reduce_scatter_base": ("reduce_scatter", 1),
        "reduce_scatter": ("reduce_scatter", 1),
        "all_reduce": ("all_reduce", 0),
        "broadcast": ("broadcast", 0),
    }

    def __init__(self):
        import torch.distributed as dist

        self.bytes = {k: 0 for k, _ in self.KINDS.values()}
        self.calls = dict.fromkeys(self.bytes, 0)
        for name, (kind, arg) in self.KINDS.items():
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(getattr(dist, name), kind, arg))

    def _wrap(self, fn, kind: str, arg: int):
        def counted(*args, **kwargs):
            t = args[arg] if len(args) > arg else next(iter(kwargs.values()), None)
            n = sum(_nbytes(x) for x in t) if isinstance(t, (list, tuple)) else (_nbytes(t) if t is not None else 0)
            self.bytes[kind] += n
            self.calls[kind] += 1
            return fn(*args, **kwargs)

        return counted

    def reset(self) -> None:
        for k in self.bytes:
            self.bytes[k], self.calls[k] = 0, 0


def worker(argv: list[str]) -> None:
    """One rank under torchrun: build megagpt's engine, run a few steps, write rank<R>.json."""
    p = argparse.ArgumentParser(prog="python -m megagpt.bench.memory --worker")
    p.add_argument("--stage", type=int, required=True)
    p.add_argument("--n-layer", type=int, required=True)
    p.add_argument("--n-head", type=int, required=True)
    p.add_argument("--n-embd", type=int, required=True)
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--micro-batch", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--override", action="append", default=[])
    a = p.parse_args(argv)

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import torch
    import torch.distributed as dist
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from megagpt import runtime
    from megagpt.config import register
    from megagpt.config_checks import validate
    from megagpt.engine import build_engine, build_model_config, deepspeed_config
    from megagpt.model.attention import resolve_backend
    from megagpt.train import CONF_DIR

    env = runtime.read_env()
    register()
    overrides = [
        f"deepspeed=zero{a.stage}",
        "logger=none",
        f"model.n_layer={a.n_layer}",
        f"model.n_head={a.n_head}",
        f"model.n_embd={a.n_embd}",
        f"model.vocab_size={a.vocab}",
        f"data.seq_len={a.seq_len}",
        f"trainer.micro_batch_size={a.micro_batch}",
        f"trainer.max_steps={max(a.steps, 1)}",
        "optim.warmup_steps=1",
        *a.override,
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=overrides))
    validate(cfg, env.world_size)
    device = torch.device("cpu")
    threads = runtime.set_cpu_threads(env, cfg.trainer.cpu_threads)
    comm = CommCounter()  # before DeepSpeed's comm backend starts: it keeps references to the functions
    runtime.init_distributed(env, "gloo", device, cfg.deepspeed.timeout_minutes)
    baseline = _rss_now()
    model_cfg = build_model_config(cfg, a.vocab, resolve_backend("auto", "cpu"))
    ds_config = deepspeed_config(cfg, env.world_size, "cpu")
    train_engine = build_engine(cfg, model_cfg, ds_config, env.rank, env.world_size, device)
    engine, model, optimizer = train_engine.ds_engine, train_engine.model, train_engine.optimizer
    optimizer.agree = lambda bad: bad  # this bench drives the steps itself: no exchange between ranks
    after_build = _rss_now()
    gen = torch.Generator().manual_seed(env.rank)
    grads, losses, t0 = 0, [], time.perf_counter()
    for _ in range(a.steps):
        comm.reset()  # the last step's collectives are kept (the first one also traces, under ZeRO-3)
        x = torch.randint(0, a.vocab, (a.micro_batch, a.seq_len + 1), generator=gen)
        optimizer.new_step(torch.zeros((), dtype=torch.bool))
        loss = engine(x[:, :-1], x[:, 1:])
        engine.backward(loss)
        grads = max(grads, grad_bytes(model, engine, a.stage))
        engine.step()
        losses.append(float(loss.detach()))
    record = {
        "rank": env.rank,
        "world_size": env.world_size,
        "zero_stage": a.stage,
        "threads": threads,
        **measure_state(model, optimizer, engine, a.stage),
        "grad_bytes": grads,
        "rss_baseline_bytes": baseline,
        "rss_after_build_bytes": after_build,
        "rss_end_bytes": _rss_now(),
        "peak_rss_bytes": _rss_peak(),
        "losses": losses,
        "seconds_per_step": (time.perf_counter() - t0) / max(1, a.steps),
        "comm_bytes_last_step": dict(comm.bytes),
        "comm_calls_last_step": dict(comm.calls),
    }
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"rank{env.rank}.json"), "w") as f:
        json.dump(record, f)
    dist.barrier()
    runtime.leave(0)


def run_job(args, stage: int, ranks: int, root: str) -> list[dict]:
    from megagpt.bench.scaling import torchrun

    out = os.path.join(root, f"zero{stage}-x{ranks}")
    threads = max(1, (os.cpu_count() or 1) // ranks)
    torchrun(
        [
            "-m",
            "megagpt.bench.memory",
            "--worker",
            f"--stage={stage}",
            f"--n-layer={args.n_layer}",
            f"--n-head={args.n_head}",
            f"--n-embd={args.n_embd}",
            f"--vocab={args.vocab}",
            f"--seq-len={args.seq_len}",
            f"--micro-batch={args.micro_batch}",
            f"--steps={args.steps}",
            f"--out={out}",
            *(f"--override={o}" for o in args.override),
        ],
        ranks,
        out + ".log",
        args.timeout,
        threads,
    )
    recs = []
    for r in range(ranks):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            recs.append(json.load(f))
    return recs


def bench_memory(args) -> dict:
    root = args.out or tempfile.mkdtemp(prefix="megagpt-memory-")
    os.makedirs(root, exist_ok=True)
    load = os.getloadavg()
    rows = []
    for stage in args.stages:
        for ranks in args.ranks:
            t0 = time.perf_counter()
            recs = run_job(args, stage, ranks, root)
            row = {"zero_stage": stage, "ranks": ranks, "job_seconds": time.perf_counter() - t0}
            for key in (
                "param_bytes",
                "param_partition_bytes",
                "param_persistent_bytes",
                "grad_bytes",
                "optimizer_state_bytes",
                "master_param_bytes",
                "peak_rss_bytes",
                "rss_baseline_bytes",
            ):
                row[key] = max(r[key] for r in recs)  # the most loaded rank
            row["model_state_bytes"] = max(
                r["param_bytes"] + r["grad_bytes"] + r["optimizer_state_bytes"] + r["master_param_bytes"] for r in recs
            )
            row["peak_rss_above_baseline_bytes"] = max(r["peak_rss_bytes"] - r["rss_baseline_bytes"] for r in recs)
            row["model_param_bytes"] = recs[0]["model_param_bytes"]
            row["comm_bytes_per_step"] = recs[0]["comm_bytes_last_step"]
            row["comm_calls_per_step"] = recs[0]["comm_calls_last_step"]
            row["gathered_vs_model"] = row["comm_bytes_per_step"]["all_gather"] / row["model_param_bytes"]
            row["reduced_vs_model"] = (
                row["comm_bytes_per_step"]["reduce_scatter"] + row["comm_bytes_per_step"]["all_reduce"]
            ) / row["model_param_bytes"]
            row["n_params"] = recs[0]["n_params"]
            row["params_vs_replicated"] = row["param_bytes"] / row["model_param_bytes"]
            row["partition_vs_replicated"] = row["param_partition_bytes"] / row["model_param_bytes"]
            row["per_rank"] = recs
            rows.append(row)
            print(f"  ZeRO-{stage} x {ranks}: {row['job_seconds']:.0f} s", flush=True)
    n_params = rows[0]["n_params"]
    full = rows[0]["model_param_bytes"]
    model = {
        "n_layer": args.n_layer,
        "n_head": args.n_head,
        "n_embd": args.n_embd,
        "vocab": args.vocab,
        "n_params": n_params,
        "param_bytes": full,
    }
    result = {
        "overrides": args.override,
        "model": model,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "steps": args.steps,
        "cores": os.cpu_count(),
        "load_average_before": list(load),
        "load_average_after": list(os.getloadavg()),
        "run_root": root,
        "rows": rows,
    }
    if args.override:
        print("overrides: " + " ".join(args.override))
    print(
        f"model: {n_params / 1e6:.1f}M parameters ({args.n_layer} layers, width {args.n_embd}, vocab "
        f"{args.vocab}), fp32: {full / MB:,.0f} MB of parameters; seq_len {args.seq_len}, micro-batch "
        f"{args.micro_batch}, {args.steps} steps; per rank, the most loaded rank; MB = 2^20 bytes"
    )
    print(
        f"{'stage':<7} {'ranks':>5} {'params':>8} {'grads':>8} {'optim':>8} {'state':>8} "
        f"{'peak RSS':>9} {'RSS-base':>9} {'params/replicated':>18} {'1/W':>6} {'gathered':>8} {'reduced':>7}"
    )
    for row in rows:
        print(
            f"ZeRO-{row['zero_stage']:<2} {row['ranks']:>5} {row['param_bytes'] / MB:>8,.0f} "
            f"{row['grad_bytes'] / MB:>8,.0f} {row['optimizer_state_bytes'] / MB:>8,.0f} "
            f"{row['model_state_bytes'] / MB:>8,.0f} {row['peak_rss_bytes'] / MB:>9,.0f} "
            f"{row['peak_rss_above_baseline_bytes'] / MB:>9,.0f} {row['params_vs_replicated']:>18.3f} "
            f"{1 / row['ranks'] if row['zero_stage'] == 3 else 1:>6.3f} {row['gathered_vs_model']:>7.2f}x "
            f"{row['reduced_vs_model']:>6.2f}x"
        )
    print(
        "params: partition + small parameters kept whole (persistence threshold); state = params + grads "
        "+ optimizer (+ master copies); RSS-base: peak RSS minus the RSS before the model was built;\n"
        "gathered / reduced: bytes all-gathered / reduced (reduce-scatter + all-reduce) by rank 0 in the last step, "
        "in model sizes (a 1-rank group still calls the collectives)"
    )
    return result


def add_parser(sub) -> None:
    m = sub.add_parser("memory", help="per-rank memory of ZeRO-0 and ZeRO-3 as ranks grow")
    m.add_argument("--n-layer", type=int, default=8)
    m.add_argument("--n-head", type=int, default=16)
    m.add_argument("--n-embd", type=int, default=1024)
    m.add_argument("--vocab", type=int, default=4096)
    m.add_argument("--seq-len", type=int, default=64)
    m.add_argument("--micro-batch", type=int, default=2)
    m.add_argument("--steps", type=int, default=2)
    m.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    m.add_argument("--stages", type=int, nargs="+", default=[0, 3], choices=[0, 3])
    m.add_argument(
        "--override",
        action="append",
        default=[],
        help="extra config key=value for every job, e.g. deepspeed.reduce_bucket_size=5000000",
    )
    m.add_argument("--out", help="keep the jobs' outputs here (default: a new temp dir)")
    m.add_argument("--timeout", type=float, default=1200, help="seconds per job")
    m.add_argument("--json", help="also write the figures to this file")
    m.set_defaults(run=bench_memory)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        sys.exit("usage: python -m megagpt.bench memory ... (--worker is for the jobs it starts)")
