"""DeepSpeed's faults (0.19.8) and how megagpt works around each, beside the
test that fails without it.  When DeepSpeed changes, this is the file to
re-read: each workaround says what it undoes and which test proves it still
matters.

- `restore_torch_linear_unless`: zero.Init's process-wide F.linear patch
  (tests/test_zero3_settings.py::test_memory_efficient_linear_false_trains_with_torchs_linear_even_after_true).
- `check_module_granularity`: a granularity threshold that makes the root
  module a ZeRO-3 leaf fails in backward (tests/test_zero3_settings.py::
  test_a_granularity_threshold_that_makes_the_whole_model_a_leaf_is_refused
  and ::test_a_whole_model_leaf_is_refused_in_a_run).
- `universal_load`: the universal format is chosen through a private config
  field (tests/test_elastic_resume.py, zero1..3: every resharded resume).
- `repair_stage3_universal_load`: ZeRO-3's universal load shares one step
  count and copies group 0's hyperparameters (tests/test_elastic_resume.py::
  test_resharded_state_is_the_saved_state_element_for_element, zero3).
- `hold_write_errors`: a rank that fails a write inside DeepSpeed's save
  leaves the others waiting in its collectives (tests/test_save_failures.py::
  test_a_full_disk_during_a_save_is_one_line_and_the_previous_checkpoint_stays_the_newest).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from megagpt.atomic import write_failure
from megagpt.config import ConfigError


def restore_torch_linear_unless(memory_efficient: bool) -> None:
    """deepspeed.zero.Init with memory_efficient_linear replaces F.linear for the
    whole process, and nothing puts it back: a later engine in the same process
    (a Hydra -m sweep) would keep it whatever its settings.  Put torch's back
    unless this engine asked for DeepSpeed's.  Without it:
    tests/test_zero3_settings.py::test_memory_efficient_linear_false_trains_with_torchs_linear_even_after_true."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as zero_init

    original = getattr(zero_init, "linear_bk", None)  # saved by DeepSpeed when it patched
    if not memory_efficient and original is not None:
        torch.nn.functional.linear = original


def check_module_granularity(threshold: int, model) -> None:
    """deepspeed.stage3_module_granularity_threshold against the model built for ZeRO-3 (before
    deepspeed.initialize).  DeepSpeed makes each module whose granularity (its parameters per
    layer) is at most the threshold one ZeRO-3 leaf, parents first.  A threshold that reaches the
    whole model makes the root module a leaf, and DeepSpeed 0.19.8 cannot train that: the model's
    inputs (token ids) need no gradient, so the leaf's backward hook fires at the start of
    backward and partitions the parameters before their gradients arrive ("output with shape
    [1] doesn't match the broadcast shape [64]").  Refused in one line instead.  Without it:
    tests/test_zero3_settings.py::test_a_whole_model_leaf_is_refused_in_a_run."""
    layers, params = _granularity(model)
    # DeepSpeed's rule (DeepSpeedZeRoOffload._get_granularity_recursively): no leaf above 1e9 parameters.
    root = params // layers if layers and params <= 1e9 else None
    if not (threshold == 0 or root is None or threshold < root):
        raise ConfigError(
            f"deepspeed.stage3_module_granularity_threshold: {threshold} makes the whole model one "
            f"ZeRO-3 leaf (its granularity is {root} parameters per layer), which DeepSpeed cannot "
            f"train; use less than {root}, or deepspeed.stage3_leaf_blocks=true"
        )


def _granularity(module) -> tuple[int, int]:
    """(layers, parameters) of a module as DeepSpeed counts them for its granularity: a module
    without children is one layer, a container (ModuleList, ...) none of its own, any other
    module one more than its children; parameters at their full size (ds_numel under ZeRO-3)."""
    if next(module.parameters(), None) is None:
        return 0, 0
    params = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters(recurse=False))
    children = list(module.children())
    if not children:
        return 1, params
    layers = 0
    for child in children:
        n, p = _granularity(child)
        layers, params = layers + n, params + p
    if module.__class__.__name__ in torch.nn.modules.container.__all__:
        return layers, params
    return layers + 1, params


@contextlib.contextmanager
def universal_load(engine, universal: bool) -> Iterator[None]:
    """Within the block, `engine.load_checkpoint` reads DeepSpeed's universal
    format where `universal` says so.  DeepSpeed takes the choice from its
    config (`load_universal_checkpoint`), fixed when the engine is built; the
    private field it reads at load time is set for this one load only.
    Without it: tests/test_elastic_resume.py (every resharded resume, zero1..3)."""
    engine._config.load_universal_checkpoint = universal  # read by DeepSpeed at load time only
    try:
        yield
    finally:
        engine._config.load_universal_checkpoint = False


def repair_stage3_universal_load(engine, universal_dir: str) -> None:
    """Undo two faults of DeepSpeed 0.19.8's ZeRO-3 universal load
    (`DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3`),
    which made a resharded run drift from its first update on:

    - It stores one and the same `step` tensor in the state of every
      parameter group.  torch's AdamW increments each group's step in place,
      so with two groups the shared count went up twice per update and the
      second group's bias correction ran one step ahead, then two, ...
    - It copies the checkpoint's group-0 hyperparameters into every group,
      assuming they are all the same.  megagpt's groups differ in
      weight_decay (decay: optim.weight_decay; biases and norm gains: 0), so
      the no-decay group came back decaying.

    The converted checkpoint records every group (zero/optimizer_state.pt).
    ZeRO-1/2 universal loads read each group on its own and need neither.
    Without it: tests/test_elastic_resume.py::test_resharded_state_is_the_saved_state_element_for_element
    and ::test_resharded_resume_matches_the_uninterrupted_run (zero3)."""
    inner = engine.optimizer.optimizer  # the wrapped torch AdamW
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()  # one count per group
    # DeepSpeed pickles its loss scaler into this file (weights_only cannot read
    # it); DeepSpeed's own loader has just read the same file the same way.
    saved = torch.load(
        os.path.join(universal_dir, "zero", "optimizer_state.pt"), map_location="cpu", weights_only=False
    )["optimizer_state_dict"]["param_groups"]
    if len(saved) != len(inner.param_groups):
        raise RuntimeError(
            f"checkpoint {universal_dir}: {len(saved)} optimizer parameter groups, "
            f"the model has {len(inner.param_groups)}"
        )
    for group, saved_group in zip(inner.param_groups, saved):
        group.update({key: value for key, value in saved_group.items() if key != "params"})


def hold_write_errors(engine, errors: list[str]) -> None:
    """DeepSpeed's save writes its files between collectives (a barrier, a
    check that every rank saves the same tag, a last barrier): a rank that
    raised out of it at a failed write (a full disk) would leave the others
    waiting there.  Its writes are made to record their error in `errors`
    (one line, atomic.write_failure) and write nothing more once one failed,
    so every rank leaves DeepSpeed's save together; the checkpointer then
    stops them all with the error (Checkpointer.save).  Installed once per
    engine: `errors` is the list every later save reads.  Without it:
    tests/test_save_failures.py::
    test_a_full_disk_during_a_save_is_one_line_and_the_previous_checkpoint_stays_the_newest."""
    if getattr(engine, "_megagpt_holds_write_errors", False):
        return

    def held(write):
        def call(*args, **kwargs):
            if errors:  # this save has failed: nothing more is written
                return None
            try:
                return write(*args, **kwargs)
            except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
                path = next((a for a in args if isinstance(a, str)), "")
                errors.append(write_failure(path, e))
                return None

        return call

    engine.checkpoint_engine.save = held(engine.checkpoint_engine.save)
    engine._copy_recovery_script = held(engine._copy_recovery_script)  # zero_to_fp32.py, rank 0
    engine._megagpt_holds_write_errors = True
