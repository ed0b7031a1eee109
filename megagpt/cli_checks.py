"""The command line checked before Hydra runs the job: bad input becomes one
line naming what is wrong, not Hydra's multi-line report or a traceback.

`check_command_line` composes the config once, the way Hydra is about to
(`@hydra.main`'s config dir, config name and search path, with
--config-path/-cp, --config-name/-cn and --config-dir/-cd), and reports: an
unknown key or a bad value (on the command line or in a config file, whose
path it names), a config file YAML cannot parse (file:line:column).  A
multirun (-m) has every point composed and checked before the first one
runs, and points that would share a run.dir are refused.  Hydra's other
commands (--cfg, --help, --info, ...) go straight to Hydra.

It sets Hydra up through Hydra's own internal helpers (hydra._internal), the
ones `@hydra.main` uses, and puts Hydra's global state back afterwards.
"""

from __future__ import annotations

import contextlib
import os

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from megagpt.config import ConfigError, check_known_keys, unknown_key_error, yaml_syntax_error


def check_command_line(argv: list[str], task_function, conf_dir: str) -> str | None:
    """Compose the config once, the way Hydra is about to (the same config dir,
    config name, search path: --config-path/-cp, --config-name/-cn,
    --config-dir/-cd), so that bad input becomes one line, not Hydra's
    multi-line report or a traceback: an unknown key or a bad value (on the
    command line or in a config file, whose path it names), a config file YAML
    cannot parse (file:line:column). A multirun (-m) has every point composed
    and checked before the first one runs, and points that would share a
    run.dir (the second would resume the first's checkpoint) are refused.
    Hydra's other commands (--cfg, --help, --info, ...) and anything this
    cannot compose as Hydra would go straight to Hydra."""
    import yaml
    from hydra.errors import HydraException

    args = _hydra_args(argv)
    if args is None or any(getattr(args, flag, None) for flag in _HYDRA_COMMANDS):
        return None
    search_path = None
    try:
        with _hydra_as_launched(args, task_function, conf_dir) as (hydra, search_path):
            _check_config(hydra, args)
    except ConfigError as e:
        return str(e)
    except ValueError as e:  # Hydra's own checks of the flags (e.g. a --config-path naming a .yaml file)
        return str(e).splitlines()[0]
    except yaml.MarkedYAMLError as e:
        return str(yaml_syntax_error(e))
    except (HydraException, OmegaConfBaseException) as e:
        return _one_line(e, search_path)
    return None


# Hydra's flags for commands other than compose-and-run: Hydra handles them itself.
_HYDRA_COMMANDS = ("help", "hydra_help", "cfg", "info", "shell_completion", "experimental_rerun")


def _hydra_args(argv: list[str]):
    """argv as `@hydra.main` reads it (Hydra's own parser); None where Hydra
    would stop at the flags themselves (--version, a bad flag): it says so itself."""
    import io

    from hydra._internal.utils import get_args_parser

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return get_args_parser().parse_args(argv)
    except SystemExit:
        return None


@contextlib.contextmanager
def _hydra_as_launched(args, task_function, conf_dir: str):
    """A Hydra set up as `@hydra.main` sets it up for these flags
    (hydra._internal.utils._run_hydra): the same primary config path and search
    path. Hydra's global state is put back afterwards: the real launch sets it up itself."""
    from hydra._internal import utils as launch
    from hydra._internal.hydra import Hydra
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import SearchPathException

    calling_file, calling_module = launch.detect_calling_file_or_module_from_task_function(task_function)
    config_path = args.config_path if args.config_path is not None else conf_dir
    launch.validate_config_path(config_path)
    search_path = launch.create_automatic_config_search_path(calling_file, calling_module, config_path)
    if args.config_dir is not None:
        config_dir = os.path.abspath(args.config_dir)
        if not os.path.isdir(config_dir):
            raise SearchPathException(f"Additional config directory '{config_dir}' not found")
        search_path.prepend(
            provider="command-line", path=f"file://{config_dir}", anchor=SearchPathQuery(provider="schema")
        )
    global_hydra, hydra_config = GlobalHydra.instance(), HydraConfig.instance()
    before = global_hydra.hydra, hydra_config.cfg
    try:
        yield (
            Hydra.create_main_hydra2(
                task_name=launch.detect_task_name(calling_file, calling_module), config_search_path=search_path
            ),
            search_path,
        )
    finally:
        global_hydra.hydra, hydra_config.cfg = before


def _check_config(hydra, args) -> None:
    """Compose and check the job's config, or for a multirun every point's,
    as Hydra's launch would (`hydra.mode` from the config counts as -m does)."""
    from hydra.types import RunMode

    config_name = args.config_name or "config"  # @hydra.main's
    overrides = list(args.overrides)
    mode = hydra.get_mode(config_name=config_name, overrides=overrides)
    if not (args.multirun or mode == RunMode.MULTIRUN):
        # from_shell=False: the compose API's shorter wording of the first line
        config = hydra.compose_config(
            config_name=config_name, overrides=overrides, run_mode=RunMode.RUN, from_shell=False
        )
        _check_job(config, "hydra.run.dir", None)
        return
    if mode != RunMode.MULTIRUN:
        overrides.append("hydra.mode=MULTIRUN")  # as Hydra's launch adds it
    master = hydra.compose_config(
        config_name=config_name, overrides=overrides, run_mode=RunMode.MULTIRUN, from_shell=False
    )
    points = _sweep_points(hydra, master)
    if points is None:
        return
    run_dirs: dict[str, int] = {}
    for num, point in enumerate(points):
        config = hydra.config_loader.load_sweep_config(master, list(point))
        with open_dict(config):  # as Hydra's BasicLauncher numbers the jobs
            config.hydra.job.id = num
            config.hydra.job.num = num
        run_dir = _check_job(config, "hydra.sweep.dir", "hydra.sweep.subdir")
        if run_dir is not None and run_dir in run_dirs:
            raise ConfigError(_shared_run_dir(run_dir, run_dirs[run_dir], num, points, config))
        if run_dir is not None:
            run_dirs[run_dir] = num


def _sweep_points(hydra, master: DictConfig) -> list[list[str]] | None:
    """Each point's overrides, in job order, as Hydra's BasicSweeper computes
    them (hydra.sweeper.params from the config, then the command line's); None
    for another sweeper (a plugin's points are known only as it runs)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if master.hydra.sweeper.get("_target_") != f"{BasicSweeper.__module__}.{BasicSweeper.__name__}":
        return None
    params = master.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()]
    arguments += OmegaConf.to_container(master.hydra.overrides.task, resolve=False)
    parsed = OverridesParser.create(config_loader=hydra.config_loader).parse_overrides(arguments)
    return [point for batch in BasicSweeper.split_arguments(parsed, None) for point in batch]


def _check_job(config: DictConfig, dir_key: str, subdir_key: str | None) -> str | None:
    """Check one job's composed config as the job will see it (Hydra's run_job:
    its output dir and HydraConfig set, so `${hydra:...}` resolves); its
    run.dir, absolute, or None when unset (the default differs per job)."""
    import copy

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import read_write

    HydraConfig.instance().set_config(config)
    output_dir = str(OmegaConf.select(config, dir_key))
    if subdir_key is not None:
        output_dir = os.path.join(output_dir, str(OmegaConf.select(config, subdir_key)))
    with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
        config.hydra.runtime.output_dir = os.path.abspath(output_dir)
    HydraConfig.instance().set_config(config)
    check_known_keys(config)
    job = copy.deepcopy(config)
    with read_write(job), open_dict(job):
        del job["hydra"]
    run_dir = OmegaConf.to_object(job).run.dir
    if run_dir is None:
        return None
    # With hydra.job.chdir the job runs in its output dir, and a relative run.dir is under it.
    base = output_dir if config.hydra.job.chdir else os.getcwd()
    return os.path.normpath(os.path.join(os.path.abspath(base), run_dir))


def _shared_run_dir(run_dir: str, first: int, second: int, points: list[list[str]], config: DictConfig) -> str:
    """The line for two points with one run.dir, with a run.dir that would
    differ: the first swept key that tells the two points apart, as an
    interpolation (a config group's choice through Hydra's runtime.choices)."""
    differing = [b.split("=", 1)[0].lstrip("+~") for a, b in zip(points[first], points[second]) if a != b]
    key = differing[0] if differing else None
    if key is None:
        part = "${hydra:job.num}"
    elif isinstance(OmegaConf.select(config, key, default=None), DictConfig) or key in config.hydra.runtime.choices:
        part = f"${{hydra:runtime.choices.{key}}}"
    else:
        part = f"${{{key}}}"
    return (
        f"run.dir: points {first} and {second} of this multirun share run.dir {run_dir} (the second would "
        f"resume the first's checkpoint); make run.dir differ per point, e.g. 'run.dir={run_dir}/{part}', "
        "or leave it unset: each point then gets its own default"
    )


def _one_line(e: BaseException, search_path=None) -> str:
    cause = e.__cause__ or e.__context__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and getattr(cause, "full_key", None):
        # An unknown key: the same line as for one added with `+` (check_known_keys).
        return str(unknown_key_error(cause.full_key, getattr(cause, "object_type", None))) + _in_file(e, search_path)
    parts = [str(e).splitlines()[0].strip()]
    if getattr(e, "override", None):  # Hydra could not parse this override
        parts = [
            f"cannot parse override {e.override!r}: {parts[0]} (quote values with special characters: key='value')"
        ]
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause) and str(cause).splitlines()[0].strip() != str(e).splitlines()[0].strip():
        parts.append(str(cause).splitlines()[0].strip())
        key = getattr(cause, "full_key", None)
        if key and key not in " ".join(parts):
            parts.append(f"(key {key})")
        if isinstance(cause, OmegaConfBaseException):  # a value in a config file
            parts.append(_in_file(e, search_path).strip())
    return " ".join(p for p in parts if p)


def _in_file(e: BaseException, search_path) -> str:
    """` in <file>` for an error Hydra reports as "In '<config>': ...": the
    first file of that name on the search path, as Hydra looks it up; '' if
    it is not a file (a schema, a package's config)."""
    import re

    match = re.match(r"In '([^']+)':", str(e))
    if match is None or search_path is None:
        return ""
    for entry in search_path.get_path():
        if entry.path.startswith("file://"):
            candidate = os.path.join(entry.path[len("file://") :], match.group(1) + ".yaml")
            if os.path.isfile(candidate):
                return f" in {candidate}"
    return ""
