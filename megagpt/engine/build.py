"""Building the engine: the model constructed inside `deepspeed.zero.Init`
(ZeRO-3: each parameter is partitioned as soon as its module is built, so no
rank ever holds the whole model), its weights initialised module by module,
wrapped in a DeepSpeed engine with megagpt's AdamW (optimizer.py) and the
warmup + cosine schedule (ds_config.py), optionally compiled."""

from __future__ import annotations

from collections.abc import Callable

import torch

from megagpt.config import Config
from megagpt.engine import faults
from megagpt.engine.groups import join_process_group
from megagpt.engine.optimizer import build_optimizer
from megagpt.engine.train_engine import TrainEngine
from megagpt.metrics import console
from megagpt.model.gpt import GPT, GPTConfig


def build_model_config(
    cfg: Config, vocab_size: int, attention: str, eod_id: int | None = None, device_type: str = "cpu"
) -> GPTConfig:
    """The model's config: the `model.*` settings, with the tokenizer's vocab size, data.seq_len, the
    resolved attention backend and the end-of-document id, and model.compile and
    model.loss_chunk_tokens resolved for `device_type` (GPTConfig.from_settings)."""
    return GPTConfig.from_settings(
        cfg.model,
        vocab_size=vocab_size,
        seq_len=cfg.data.seq_len,
        attention=attention,
        eod_id=eod_id,
        device_type=device_type,
    )


def build_engine(
    cfg: Config,
    model_cfg: GPTConfig,
    ds_config: dict,
    rank: int,
    world_size: int,
    device: torch.device,
    load: Callable[[str, torch.nn.Module], None] | None = None,
) -> TrainEngine:
    """The model is built sharded under ZeRO-3.  `ds_config`: DeepSpeed's
    JSON (ds_config.deepspeed_config).  `load`: where the weights come from
    (see init_weights); by default a random initialisation.
    Where model_cfg.compile (the resolved model.compile) says so, each block is
    compiled (GPT.compile_blocks; under ZeRO-3 the blocks are then leaves);
    DeepCompile (deepspeed.deepcompile) compiles the whole model through
    DeepSpeed's engine.compile()."""
    import deepspeed
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE

    join_process_group()
    stage3 = cfg.deepspeed.zero_stage == 3
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=stage3):
        model = GPT(model_cfg)
    faults.restore_torch_linear_unless(stage3 and cfg.deepspeed.stage3_memory_efficient_linear)
    if stage3 and cfg.deepspeed.stage3_module_granularity_threshold:
        faults.check_module_granularity(cfg.deepspeed.stage3_module_granularity_threshold, model)
    init_weights(model, cfg.trainer.seed, rank, stage3, load)
    if stage3 and model_cfg.loss_chunk_tokens:
        # The chunked loss (model/loss.py) reads the head's weight as a tensor in the
        # model's own forward: the head module never runs, so its hooks do not gather
        # it (DeepSpeed's parameter getter would, in an eager forward, but not while
        # torch.compile traces).  An external parameter of the root module is gathered
        # for the model's whole forward and backward (tied, it is the embedding's too).
        # Without it: tests/test_zero3_settings.py::
        # test_build_engine_sets_leaf_blocks_and_the_heads_external_parameter.
        deepspeed.zero.register_external_parameter(model, model.lm_head.weight)
    blocks_compiled = model_cfg.compile and not cfg.deepspeed.deepcompile
    if stage3 and leaf_blocks(cfg.deepspeed.stage3_leaf_blocks, blocks_compiled):
        # Each block is one ZeRO-3 leaf: its parameters gathered together, no hooks inside it.
        from deepspeed.utils import set_z3_leaf_modules

        from megagpt.model.gpt import Block

        set_z3_leaf_modules(model, [Block])
    if model_cfg.fp8 != "off":  # float8 training through torchao: the large Linear layers
        from megagpt.model import float8

        float8.check_fp8_supported(model_cfg.fp8, device)
        names = float8.convert(model, model_cfg.fp8, model_cfg.fp8_min_dim)
        if rank == 0:
            console(
                f"fp8: converted {len(names)} Linear layers to float8 ({model_cfg.fp8}, min dim "
                f"{model_cfg.fp8_min_dim}); the output head stays in bf16"
            )
    if blocks_compiled:
        model.compile_blocks()  # compiled at the first forward
    optimizer = build_optimizer(cfg.optim, model, device.type)
    # Saved into every checkpoint, this marks it convertible to DeepSpeed's
    # universal format (resharding to another number of ranks): without it
    # ds_to_universal refuses ZeRO-1/2 checkpoints (tests/test_elastic_resume.py,
    # zero1 and zero2).  megagpt has no tensor or pipeline parallelism, so there
    # are no patterns to declare.
    model.universal_checkpoint_info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    # DeepSpeed's WarmupCosineLR starts at iteration -1, learning rate 0, and
    # the engine steps it after each optimizer step: step 1 would not learn at
    # all, and step k would run at the schedule's point k - 2.  One step here
    # puts step k at point k - 1: step 1 at lr / warmup_steps, the last step at
    # lr * min_lr_ratio.  (A resume loads the schedule's own state over this.)
    # Without it every loss changes: the reference losses (tests/helpers.py
    # check_reference) and tests/test_resume_config.py's rates fail.
    engine.lr_scheduler.step()
    if cfg.trainer.async_save:  # saves staged in host memory, written by the checkpointer's thread
        from megagpt.engine.staged_save import StagedCheckpointEngine

        engine.checkpoint_engine = StagedCheckpointEngine(device, engine.checkpoint_serialization_enabled())
    if cfg.deepspeed.deepcompile:
        engine.compile()  # DeepSpeed's DeepCompile ({"compile": {"deepcompile": true}} in ds_config): the model
    return TrainEngine(engine, model, optimizer, cfg.deepspeed.zero_stage, rank, world_size, device)


def leaf_blocks(setting: bool | None, compiled: bool) -> bool:
    """deepspeed.stage3_leaf_blocks, resolved: None (auto) is on where the
    blocks are compiled, so that no ZeRO-3 hook runs inside a compiled block
    (each one would break its graph)."""
    return compiled if setting is None else setting


def init_weights(
    model: GPT, seed: int, rank: int, sharded: bool, load: Callable[[str, torch.nn.Module], None] | None = None
) -> None:
    """Fill the weights, one module at a time: `load(name, module)` fills the
    parameters a module owns directly (hf_import.module_loader: from a model
    folder); by default the model's random initialisation, the same for any
    world size and ZeRO stage (one generator walks the modules in order).
    Sharded (ZeRO-3), each module's parameters are gathered, rank 0 fills them
    and DeepSpeed re-partitions them (broadcasting rank 0's values): no rank
    holds more than one module's full weights."""
    if load is None:
        if not sharded:
            model.init_weights(seed)
            return
        generator = torch.Generator().manual_seed(seed)

        def load(name: str, module: torch.nn.Module) -> None:
            model.init_module_(module, generator)

    if not sharded:
        for name, module in model.named_modules():
            load(name, module)
        return
    import deepspeed

    return_freed_memory = _heap_trimmer()
    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if rank == 0:
                load(name, module)
        return_freed_memory()


def _heap_trimmer() -> Callable[[], None]:
    """A function that hands the freed heap back to the OS.  Gathering one
    module after another allocates and frees large buffers; glibc raises its
    mmap threshold after such frees and then keeps them in the heap, so
    without this a rank's resident memory grew by about the whole model's size
    while building it (measured: 103 MB for a 110 MB model), though it held one
    module at a time (tests/test_init_from.py::test_loading_holds_one_module_at_a_time)."""
    import ctypes
    import ctypes.util

    try:
        malloc_trim = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to trim
        return lambda: None
    return lambda: malloc_trim(0)
