"""The engine: where the plain model meets DeepSpeed.  This package is the only
place in megagpt that imports `deepspeed` or knows its file names, layouts and
faults (tests/test_import_layers.py checks the imports).

What the rest of megagpt calls, in megagpt's own terms (the shape of
OLMo-core's TrainModule):

    engine = build_engine(cfg, model_cfg, deepspeed_config(cfg, world, device.type, model_cfg.n_embd),
                          rank, world, device, load=None)       # the model built sharded, weights filled
    result = engine.train_batch(micro_batches)                   # one optimizer step, device tensors
    outcome = result.read()                                      # its one host transfer
    engine.eval_losses(batches)                                  # (len(batches),) mean losses
    write = engine.save(root, tag)                               # root/tag/; a writer where staged (async_save)
    engine.take_write_error()                                    # this rank's failed write, if any
    engine.load(path, saved_world_size)                          # the same layout, or resharded
    consolidated_weights(path, zero_stage)                       # full fp32 weights, for export

A state the engine cannot load or read raises `EngineStateError`; the
checkpointer and export report it as their own CheckpointError.

Modules:
- build.py: `build_engine`, `init_weights` (module by module, gathered under
  ZeRO-3), `build_model_config`.
- train_engine.py: `TrainEngine`, `StepResult`, `StepOutcome`.
- optimizer.py: AdamW that skips a non-finite update on every rank, on the device.
- ds_config.py: DeepSpeed's JSON from megagpt's config.
- staged_save.py: DeepSpeed's checkpoint engine replaced, for trainer.async_save.
- checkpoint_files.py: DeepSpeed's checkpoint files read offline: the copy in
  the universal format, the whole model's weights.
- faults.py: DeepSpeed's faults and the workaround of each, naming the test
  that fails without it.
- groups.py: the process groups the engine trains over.

Why one package: DeepSpeed's details change with its versions (the faults of
0.19.8 that faults.py undoes, private fields, file names).  Kept here, an
upgrade of DeepSpeed, or a move to another sharding library, is a change to
this package and its tests alone; the checkpointer (checkpoint.py: writing,
hashing, verifying, committing directories), export (renaming full weights
for Hugging Face), the loop and the run never see a ZeRO shard, a DeepSpeed
file name or a DeepSpeed object.

How later parallelism extends it rather than reaching around it: the engine
owns its process groups and its sharded state.
- Process groups: runtime.init_distributed brings up the world group; the
  engine joins DeepSpeed to it (groups.py).  Expert parallelism (MoE) and
  sequence parallelism add their groups there, made from the world group
  when the engine is built, and keep them on the TrainEngine.
- Sharding: applied in build_engine, after the plain model is built and
  before DeepSpeed wraps it (as ZeRO-3's partitioning and leaf modules are
  now): expert-sharded parameters and sequence splitting are one more step
  there.  The model stays a plain nn.Module.
- State: whatever shards the engine holds, `save(root, tag)` writes them
  under root/tag and `load(path, saved_world_size)` reads them back, deciding
  whether the saved layout fits or must be resharded (DeepSpeed's universal
  format carries the patterns of sharded parameters through
  `universal_checkpoint_info`, build.py); `consolidated_weights` returns full
  weights whatever the shards.  Where a layout needs more than the world size
  to describe it, the engine records it in its own files and `load` reads it
  there: the checkpointer's contract (a directory of files to hash and
  commit) does not change.
"""

from megagpt.engine.build import build_engine, build_model_config, init_weights, leaf_blocks
from megagpt.engine.checkpoint_files import EngineStateError, consolidated_weights
from megagpt.engine.ds_config import deepspeed_config, resolve_precision
from megagpt.engine.train_engine import StepOutcome, StepResult, TrainEngine

__all__ = [
    "EngineStateError",
    "StepOutcome",
    "StepResult",
    "TrainEngine",
    "build_engine",
    "build_model_config",
    "consolidated_weights",
    "deepspeed_config",
    "init_weights",
    "leaf_blocks",
    "resolve_precision",
]
