"""Run under torchrun: build megagpt's engine for a config, load checkpoints
into it through megagpt's own `checkpoint.restore` (rigid or through DeepSpeed's
universal format, whichever the world size calls for), and write, after each
load, the whole training state by parameter name: fp32 weights, both Adam
moments, the step count per group, every group's hyperparameters, the
learning-rate schedule and DeepSpeed's counters.  Whole tensors, gathered
from the shards, so states loaded on different numbers of ranks compare
element for element.

    torchrun --nproc_per_node=N tests/engine_state.py OUT_PREFIX CKPT [CKPT ...] -- key=value ...

writes OUT_PREFIX<i>.pt (rank 0) for the i-th checkpoint, and OUT_PREFIXinit.pt:
the weights as the engine initialised them, beside the plain model's own
initialisation (no DeepSpeed).
"""

from __future__ import annotations

import sys

import torch


def _group_states(engine, inner, zero_stage: int):
    """(group index, optimizer state) of every tensor the torch optimizer updates."""
    if zero_stage == 3:  # between steps ZeRO-3 leaves the groups' params empty; its sub-groups hold them
        zero = engine.optimizer
        for sub_group, flat in enumerate(zero.fp32_partitioned_groups_flat):
            yield zero.sub_group_to_group_id[sub_group], inner.state.get(flat, {})
        return
    for i, group in enumerate(inner.param_groups):
        for p in group["params"]:
            yield i, inner.state.get(p, {})


def full_weights(model, zero_stage: int) -> dict:
    """The fp32 weights the optimizer updates, whole, by name (before any step).
    Collective under ZeRO-3."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {
        name: (p.detach() if zero_stage == 0 else safe_get_full_fp32_param(p)).float().cpu().clone()
        for name, p in model.named_parameters()
    }


def full_state(engine, model, zero_stage: int) -> dict:
    """Collective under ZeRO-3 (gathers every partition)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    inner = engine.optimizer if zero_stage == 0 else engine.optimizer.optimizer  # the torch AdamW
    if zero_stage in (1, 2):
        # ZeRO-1/2 link each parameter to its slice of the Adam moments only
        # after the first step; link them to the state just loaded.
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    params = {}
    for name, p in model.named_parameters():
        if zero_stage == 0:  # the engine trains the module's own fp32 tensors
            state = inner.state[p]
            entry = {"fp32": p.detach(), "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
        else:
            entry = {
                "fp32": safe_get_full_fp32_param(p),
                "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq"),
            }
        params[name] = {k: v.detach().float().cpu().clone() for k, v in entry.items()}
    # Each group's step count(s), and whether two states share one step tensor
    # (torch's AdamW increments it in place: shared, it counts twice per update).
    steps: list[set] = [set() for _ in inner.param_groups]
    step_tensors = []
    for group, state in _group_states(engine, inner, zero_stage):
        if "step" in state:
            steps[group].add(float(state["step"]))
            step_tensors.append(state["step"])
    steps = [sorted(s) for s in steps]
    shared = len({id(t) for t in step_tensors}) < len(step_tensors)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
    return {
        "params": params,
        "steps": steps,
        "step_tensors_shared": shared,
        "groups": groups,
        "scheduler": engine.lr_scheduler.state_dict(),
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
    }


def main(argv: list[str]) -> None:
    sep = argv.index("--")
    out_prefix, checkpoints, overrides = argv[0], argv[1:sep], argv[sep + 1 :]

    import torch.distributed as dist
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from megagpt import checkpoint, runtime
    from megagpt.config import register
    from megagpt.data.source import open_training_data
    from megagpt.engine import build_engine, build_model_config, deepspeed_config
    from megagpt.model.attention import resolve_backend
    from megagpt.train import CONF_DIR

    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose("config", overrides=overrides))
    env = runtime.read_env()
    device = runtime.device_for(env)
    runtime.init_distributed(env, cfg.deepspeed.backend, device, cfg.deepspeed.timeout_minutes)
    data = open_training_data(cfg, env, barrier=dist.barrier)
    model_cfg = build_model_config(cfg, data.vocab_size, resolve_backend(cfg.model.attention, device.type), data.eod_id)
    ds_config = deepspeed_config(cfg, env.world_size, device.type)
    train_engine = build_engine(cfg, model_cfg, ds_config, env.rank, env.world_size, device)
    engine, model = train_engine.ds_engine, train_engine.model
    # The weights as initialised under this sharding, and (rank 0) those of the
    # plain model initialised without DeepSpeed: they must be the same.
    weights = full_weights(model, cfg.deepspeed.zero_stage)
    if env.is_main:
        from megagpt.model.gpt import GPT

        plain = GPT(model_cfg)
        plain.init_weights(cfg.trainer.seed)
        torch.save(
            {"engine": weights, "plain": {n: p.detach().clone() for n, p in plain.named_parameters()}},
            f"{out_prefix}init.pt",
        )
    for i, path in enumerate(checkpoints):
        checkpoint.restore(path, engine=train_engine, env=env, seed=cfg.trainer.seed)
        state = full_state(engine, model, cfg.deepspeed.zero_stage)
        if env.is_main:
            torch.save(state, f"{out_prefix}{i}.pt")
    dist.barrier()
    # Not the interpreter's own exit: a gloo worker still releasing the last collective's
    # tensors during finalization aborts the process (SIGABRT, "terminate called without an
    # active exception": 2 of about 15 runs of test_elastic_resume's ZeRO-3 states in CI).
    runtime.leave(0)


if __name__ == "__main__":
    main(sys.argv[1:])
