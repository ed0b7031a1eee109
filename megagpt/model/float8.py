"""float8 training of the model's large Linear layers through torchao (model.fp8).

`convert(model, recipe, min_dim)` swaps the eligible nn.Linear modules for
torchao's Float8Linear (torchao.float8.convert_to_float8_training): their
matmuls, forward and backward, run in float8 with dynamic scales, the weights
and the optimizer stay as they were.  Recipes (torchao's
Float8LinearConfig.from_recipe_name): tensorwise (one scale per tensor; the
fastest) and rowwise (a scale per row; closer to bf16 numerics, somewhat
slower).  float8 matmuls need an NVIDIA GPU of compute capability 8.9 or
later (Ada, Hopper, Blackwell); rowwise scaling needs 9.0.

Which layers (`fp8_eligible`): a Linear whose in and out features are both at
least model.fp8_min_dim and divisible by 16 (the float8 GEMM's alignment).
Small GEMMs get slower in float8: the casts and scale computations cost memory
traffic that a short matmul does not win back (torchao's and torchtitan's
guidance; gpt2-124m at width 768 converts nothing at the default 1024).
Never the output head: its weight is tied to the token embedding in the
presets, and its outputs are the logits the loss reads directly, where e4m3's
3-bit mantissa would perturb the cross-entropy of every token (torchtitan
leaves its `output` layer out for the same reason).

The engine calls `check_fp8_supported(recipe)` where it builds the model
(config_checks has already checked what needs no device), then `convert`
after the weights are initialised and before DeepSpeed and torch.compile wrap
the model (float8 is only fast compiled: compile fuses the casts).
"""

from __future__ import annotations

import dataclasses
import importlib.util

import torch
import torch.nn as nn

from megagpt.config import ConfigError

RECIPES = ("tensorwise", "rowwise")
SETTINGS = ("off", *RECIPES)
MIN_CAPABILITY = {"tensorwise": (8, 9), "rowwise": (9, 0)}
ALIGNMENT = 16
OUTPUT_HEAD = "lm_head"


def fp8_eligible(name: str, module: nn.Module, min_dim: int) -> bool:
    """Whether `convert` swaps this module (named `name` in the model)."""
    if not isinstance(module, nn.Linear) or name.split(".")[-1] == OUTPUT_HEAD:
        return False
    dims = (module.in_features, module.out_features)
    return all(d >= min_dim and d % ALIGNMENT == 0 for d in dims)


def torchao_problem() -> str | None:
    """Why torchao's float8 training cannot be imported, or None."""
    if importlib.util.find_spec("torchao") is None:
        return 'needs torchao, not installed here (pip install -e ".[fp8]")'
    try:
        import torchao.float8  # noqa: F401
    except Exception as e:  # noqa: BLE001 - whatever breaks the import is the reason fp8 is unavailable
        return f"torchao does not import: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    return None


def fp8_support_problem(
    recipe: str, torchao: str | None, capability: tuple[int, int] | None, device_name: str = ""
) -> str | None:
    """Pure: why model.fp8=`recipe` cannot run, given torchao's import problem
    (None: imports), the CUDA device's compute capability (None: no CUDA)
    and its name; None when it can."""
    if recipe not in RECIPES:
        return f"unknown recipe {recipe!r}; choose one of {SETTINGS}"
    if torchao is not None:
        return torchao
    need = MIN_CAPABILITY[recipe]
    if capability is None:
        return (
            f"{recipe} needs a CUDA GPU of compute capability >= {need[0]}.{need[1]} "
            "(H100, H200, B200, L40S...); there is none here"
        )
    if tuple(capability) < need:
        return (
            f"{recipe} needs compute capability >= {need[0]}.{need[1]}; "
            f"{device_name or 'this GPU'} has {capability[0]}.{capability[1]}"
        )
    return None


def check_fp8_supported(recipe: str, device: torch.device | int | None = None) -> None:
    """Raise ConfigError (one line, naming model.fp8) unless float8 training
    with `recipe` can run on this process's CUDA device (or `device`).  Call
    where the model is built, before `convert`."""
    cap, name = None, ""
    if torch.cuda.is_available():
        cap, name = torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device)
    problem = fp8_support_problem(recipe, torchao_problem(), cap, name)
    if problem:
        raise ConfigError(f"model.fp8: {problem}")


def convert(model: nn.Module, recipe: str, min_dim: int, *, emulate: bool = False) -> list[str]:
    """Swap the eligible Linear layers of `model` for torchao's Float8Linear,
    in place; returns their names.  `emulate`: torchao's emulation (float8
    numerics in higher precision, any device; for tests)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if recipe not in RECIPES:
        raise ConfigError(f"model.fp8: unknown recipe {recipe!r}; choose one of {SETTINGS}")
    config = Float8LinearConfig.from_recipe_name(recipe)
    if emulate:
        config = dataclasses.replace(config, emulate=True)
    chosen = {name: module for name, module in model.named_modules() if fp8_eligible(name, module, min_dim)}
    if not chosen:
        return []
    # Attributes megagpt sets on its Linear layers (is_residual_proj: the scaled
    # init, GPT.init_module_) would be lost with the old module: carry them over.
    marks = {
        name: {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"}
        for name, m in chosen.items()
    }
    convert_to_float8_training(model, config=config, module_filter_fn=lambda module, fqn: fqn in chosen)
    converted = []
    for name, module in model.named_modules():
        if name in chosen:
            for k, v in marks[name].items():
                if not hasattr(module, k):
                    setattr(module, k, v)
            if module is not chosen[name]:
                converted.append(name)
    return converted
