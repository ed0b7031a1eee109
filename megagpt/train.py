"""`torchrun -m megagpt.train [key=value ...]`: pretrain a GPT.

The command line: Hydra composes the config, bad input becomes one line on
every rank (exit code 2), and megagpt/run.py builds and runs the job
(config -> data -> model -> engine -> resume -> loop -> checkpoint).

Errors are sorted by their type, never by their text: the ones `_user_errors`
names, and ValueError (bad input as the layers below say it: run.dir unset or
different across ranks, a dataset's manifest or tokenizer, a value OmegaConf
cannot convert), are one line; anything else keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import hydra
from omegaconf import DictConfig, OmegaConf

from megagpt.config import Config, ConfigError, check_known_keys, register

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
log = logging.getLogger("megagpt")


class UserError(Exception):
    """Bad config, data or checkpoint: reported as one line, exit code 2."""


def pretrain(
    cfg: Config, point: int | None = None, chosen_model_keys: frozenset[str] = frozenset(), extra_hooks=None
) -> None:
    """One training job (megagpt/run.py wires it together). `point`: its number
    in a Hydra multirun run in this process (the default run.dir then differs
    per point); `chosen_model_keys`: the model keys set on the command line;
    `extra_hooks`: for tests only (run.build)."""
    from megagpt import run as runs
    from megagpt.runtime import read_env

    _setup_logging(read_env().is_main)
    run = runs.build(cfg, point, chosen_model_keys, extra_hooks=extra_hooks)
    try:
        try:
            run.train()
        except _user_errors() as e:
            # Said before the clean-up below: it can take seconds, and once one rank
            # has exited, the launcher terminates the others (SIGTERM) mid-way.
            _say(e)
            raise
        finally:
            run.close()
        run.finish()
    finally:
        run.release()  # run.dir is this job's until the export at the end is written too


def _setup_logging(main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if main else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # DeepSpeed reports its own set-up at INFO/WARNING; megagpt prints what matters.
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _user_errors() -> tuple[type[Exception], ...]:
    """What is reported as one line and exit code 2 (imported late: train's import stays light)."""
    from megagpt.checkpoint import CheckpointError
    from megagpt.data.shards import DataError
    from megagpt.resilience import TrainingDiverged

    return ConfigError, DataError, CheckpointError, UserError, TrainingDiverged


def _error_line(msg: str) -> None:
    # One write() of the whole line: the ranks share the launcher's stderr and
    # often fail at the same moment; print() writes the text and the newline
    # separately, so two ranks' lines could run into one.
    sys.stderr.write(f"megagpt: error (rank {os.environ.get('RANK', '0')}): {msg}\n")
    sys.stderr.flush()


def _fail(msg: str) -> None:
    from megagpt.runtime import wait_for_the_others_to_report

    _error_line(msg)
    wait_for_the_others_to_report()
    sys.exit(2)


def _say(e: BaseException) -> None:
    """Print e's one-line report now, once (the exit comes later, in _hydra_task).
    An error with several independent causes (`lines`, e.g. each config key a
    resume cannot honour) gets one line per cause."""
    if not getattr(e, "_megagpt_said", False):
        for line in getattr(e, "lines", None) or [str(e).splitlines()[0] if str(e) else type(e).__name__]:
            _error_line(line)
        e._megagpt_said = True


def _hydra_task(extra_hooks=None):
    """Hydra's entry point for the job (`extra_hooks`: run.build's, for tests only)."""

    @hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
    def _hydra_main(dcfg: DictConfig) -> None:
        try:
            check_known_keys(dcfg)
            cfg = OmegaConf.to_object(dcfg)
            pretrain(cfg, _multirun_point(), _chosen_model_keys(), extra_hooks)
        except (*_user_errors(), ValueError) as e:
            _say(e)
            sys.exit(2)

    return _hydra_main


def _multirun_point() -> int | None:
    """This job's number when Hydra's `-m` runs the points in this process."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return hc.job.num if hc.mode == RunMode.MULTIRUN else None


def _chosen_model_keys() -> frozenset[str]:
    """The `model.*` keys set on the command line; a `model=` preset sets all
    the shape keys (with model.init_from they must agree with the folder)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return frozenset()
    chosen = set()
    for override in HydraConfig.get().overrides.task:
        key = override.lstrip("+~").split("=", 1)[0]
        if key == "model":
            from megagpt.hf_import import SHAPE_KEYS

            chosen.update(SHAPE_KEYS)
        elif key.startswith("model."):
            chosen.add(key[len("model.") :])
    return frozenset(chosen)


def precheck(argv: list[str]) -> None:
    """Bad input on the command line or in a config file becomes one line on
    every rank, exit code 2, before Hydra runs the job (megagpt/cli_checks.py)."""
    from megagpt.cli_checks import check_command_line

    problem = check_command_line(argv, _hydra_task(), CONF_DIR)
    if problem is not None:
        _fail(problem)


def main(extra_hooks=None) -> None:
    """`extra_hooks`: hooks added to the run's own (run.build), for tests only:
    tests/fault_train.py injects faults with them."""
    from megagpt.resilience import end_with_launcher

    end_with_launcher()  # under torchrun: this worker ends when its agent dies, however it dies
    # DeepSpeed calls torch.distributed functions torch has renamed; the
    # FutureWarning repeats every step and says nothing to a megagpt user.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated")
    register()
    precheck(sys.argv[1:])
    from megagpt.runtime import leave

    try:
        _hydra_task(extra_hooks)()
    except SystemExit as e:  # a reported error (exit code 2), or Hydra's own exit
        if e.code == 2:
            from megagpt.runtime import wait_for_the_others_to_report

            wait_for_the_others_to_report()
        leave(e.code if isinstance(e.code, int) else (0 if e.code is None else 1))
    # The process group outlives each job: Hydra's `-m` without a launcher runs
    # the sweep's points one after another in this process, and DeepSpeed keeps
    # its groups from the first point (it cannot be initialized a second time).
    # It ends here, with the process (runtime.leave: without finalization).
    leave(0)


if __name__ == "__main__":
    main()
