"""Where metrics go: <run.dir>/metrics.jsonl, Weights & Biases, the console.

Only rank 0 constructs a `MetricsSink`; the hooks hand it one flat record per
logged step.  metrics.jsonl keeps the records as they are (one JSON object per
line, keys as in `SECTIONS`, plus `mix/<source>` and `val_loss/<source>`), a
stable format for scripts.  W&B gets the same values under section prefixes
(`train/`, `val/`, `perf/`, `data/`, `system/`), so its panels group by
section, with the step as the x axis.

How the training path speaks to the user, three ways, each for one thing:

- `console` (stdout, rank 0 only, no decoration): the lines a user reads
  to follow the run: what it is (run.dir, model, attention, resume), its
  progress lines, and what it does (saves, rollbacks, a stop, the end).
- `logging`, logger "megagpt" (stderr, timestamped; INFO and above on rank
  0, WARNING and above elsewhere: megagpt.train sets it up): warnings, when
  something is wrong and the run goes on (a skipped update, a loss spike,
  W&B unreachable, a damaged checkpoint set aside), and diagnostics (how a
  save or a conversion went).
- an error that ends the run: one line on stderr from every rank,
  `megagpt: error (rank R): ...`, written whole in one write()
  (megagpt.train; the watchdog and end_with_launcher, which end the process
  themselves, write theirs the same way).

No bare print() in the training path.  The command-line tools (prepare,
export, generate) print to stdout and stderr themselves.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys

from megagpt.atomic import atomic_open

log = logging.getLogger("megagpt")


# metrics.jsonl key -> its W&B section.  Keys not listed (there should be none) go to train/.
SECTIONS = {
    "loss": "train",
    "lr": "train",
    "grad_norm": "train",
    "tokens_seen": "train",
    "skipped_steps": "train",
    "loss_spikes": "train",
    "rollbacks": "train",
    "val_loss": "val",
    "tokens_per_sec": "perf",
    "mfu": "perf",
    "step_time": "perf",
    "eta_sec": "perf",
    "save_blocked_sec": "perf",
    "data_wait": "data",
    "data_skipped_shards": "data",
    "data_epoch": "data",
    "memory_gb": "system",
}


def wandb_name(key: str) -> str:
    """`loss` -> `train/loss`, `val_loss/code` -> `val/loss/code`, `mix/code` -> `data/mix/code`,
    `data_epoch/code` -> `data/epoch/code`."""
    head, _, rest = key.partition("/")
    if head == "mix":
        return f"data/{key}"
    if head == "val_loss":
        return "val/loss" + (f"/{rest}" if rest else "")
    section = SECTIONS.get(head, "train")
    name = head[len(section) + 1 :] if head.startswith(section + "_") else head
    return f"{section}/{name}" + (f"/{rest}" if rest else "")


def new_wandb_id() -> str:
    # W&B run ids: lowercase letters and digits.
    return secrets.token_hex(4)


def wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.expanduser("~/.netrc")
    return os.path.exists(netrc) and "api.wandb.ai" in open(netrc).read()


class MetricsSink:
    """metrics.jsonl, and W&B where logger.kind=wandb. W&B never stops or
    stalls training: wandb.init waits at most INIT_TIMEOUT_SECONDS, an online
    run that cannot start logs offline instead, and a W&B call that fails
    later costs one warning, after which the run goes on without W&B."""

    def __init__(self, run_dir: str, logger_cfg, config: dict, run_id: str | None, resumed_step: int):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if resumed_step > 0:
            _truncate_after(self.path, resumed_step)  # a resumed run never repeats a step
        else:
            # A new start (no checkpoint yet, or trainer.resume=never) appends: the
            # records of an earlier start in this run.dir are never dropped.
            kept = _count_records(self.path)
            if kept:
                log.warning(
                    "metrics.jsonl: %d record(s) of an earlier start kept; this start's records (from "
                    "step 1) follow them",
                    kept,
                )
        self.file = open(self.path, "a", buffering=1)
        self.wandb = None
        if logger_cfg.kind == "wandb":
            self.wandb = _start_wandb(run_dir, logger_cfg, config, run_id)

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self._to_wandb(
            lambda run: run.log({wandb_name(k): v for k, v in record.items() if k != "step"}, step=record["step"])
        )

    def rewind(self, step: int) -> None:
        """After a rollback to `step`: metrics.jsonl keeps one record per step,
        the re-run's. (W&B keeps its first record of a step and ignores the
        re-run's lower step numbers until they pass the last one logged.)"""
        self.file.close()
        _truncate_after(self.path, step)
        self.file = open(self.path, "a", buffering=1)
        self.log_event({"event": "rollback", "to_step": step})

    def log_event(self, event: dict) -> None:
        self._to_wandb(lambda run: run.summary.__setitem__(f"last_{event['event']}", event))

    def close(self) -> None:
        self.file.close()
        self._to_wandb(lambda run: run.finish())
        self.wandb = None

    def _to_wandb(self, call) -> None:
        """call(run) unless W&B is off or has failed; a failure (W&B's service
        gone, a closed run) is said once, and W&B is dropped for the rest of the run."""
        if self.wandb is None:
            return
        try:
            call(self.wandb)
        except Exception as e:  # noqa: BLE001 - whatever W&B raises, training goes on
            self.wandb = None
            log.warning("W&B: logging failed (%s); metrics go on to %s only", _reason(e), self.path)


def _count_records(path: str) -> int:
    """The records in metrics.jsonl; a last line cut short by a crash is dropped
    (it was never a record), so that the next one starts on a line of its own."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    if lines and not lines[-1].endswith("\n"):
        with atomic_open(path) as f:
            f.writelines(lines[:-1])
        lines = lines[:-1]
    return sum(1 for line in lines if line.strip())


# wandb.init's wait for the server (W&B's own default is 90 s, and then it raises). W&B's
# WANDB_INIT_TIMEOUT, where set, is honoured instead.
INIT_TIMEOUT_SECONDS = 30.0
# run.finish()'s wait for the upload at the end (W&B's default: no limit). What is not uploaded
# by then stays in the run's directory for `wandb sync`. WANDB_FINISH_TIMEOUT, where set, wins.
FINISH_TIMEOUT_SECONDS = 120.0


def _start_wandb(run_dir: str, logger_cfg, config: dict, run_id: str | None):
    """The W&B run: online as asked, or offline (the same id and directory)
    when the online one cannot start; None, with a warning, if W&B cannot
    start at all (metrics.jsonl still has everything)."""
    import wandb

    mode = logger_cfg.mode
    if mode == "online" and not wandb_credentials():
        log.warning("logger.mode=online but no W&B credentials (WANDB_API_KEY, `wandb login`); logging offline instead")
        mode = "offline"
    os.makedirs(os.path.join(run_dir, "wandb"), exist_ok=True)
    bounds = (
        ("init_timeout", INIT_TIMEOUT_SECONDS, "WANDB_INIT_TIMEOUT"),
        ("finish_timeout", FINISH_TIMEOUT_SECONDS, "WANDB_FINISH_TIMEOUT"),
    )
    timeouts = {name: seconds for name, seconds, env in bounds if env not in os.environ}

    def init(mode: str):
        return wandb.init(
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            name=logger_cfg.name,
            group=logger_cfg.group,
            tags=list(logger_cfg.tags),
            config=config,
            dir=run_dir,
            mode=mode,
            id=run_id,
            resume="allow",
            settings=wandb.Settings(quiet=True, console="off", x_disable_stats=False, **timeouts),
        )

    try:
        return init(mode)
    except Exception as e:  # noqa: BLE001 - W&B's errors (CommError, timeouts, a broken service) vary
        failure = e
    # The failed run still holds its id in W&B's service: a fresh service takes the offline run.
    _teardown(wandb)
    jsonl = os.path.join(run_dir, "metrics.jsonl")
    if mode != "online":
        log.warning("W&B: cannot start (%s); metrics go to %s only", _reason(failure), jsonl)
        return None
    try:
        run = init("offline")
    except Exception as e:  # noqa: BLE001
        _teardown(wandb)
        log.warning(
            "W&B: cannot reach %s (%s), nor log offline (%s); metrics go to %s only",
            _base_url(wandb),
            _reason(failure),
            _reason(e),
            jsonl,
        )
        return None
    offline = run.settings.sync_dir
    log.warning(
        "W&B: cannot reach %s (%s); logging offline to %s; upload later with: wandb sync %s",
        _base_url(wandb),
        _reason(failure),
        offline,
        offline,
    )
    return run


def _teardown(wandb) -> None:
    try:
        wandb.teardown()
    except Exception:  # noqa: BLE001 - a service that is already gone
        pass


def _base_url(wandb) -> str:
    """W&B's server as its settings resolve it (WANDB_BASE_URL, `wandb login --host`), without any
    user:password part."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        url = wandb.setup().settings.base_url
    except Exception:  # noqa: BLE001
        url = os.environ.get("WANDB_BASE_URL", "W&B")
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _reason(e: BaseException) -> str:
    """One line for W&B's exception: its last line is the root cause ("connect: connection refused"),
    its first what it was doing; the API key never appears."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = type(e).__name__ + (": " + "; ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else "")
    key = os.environ.get("WANDB_API_KEY")
    return text.replace(key, "<WANDB_API_KEY>") if key else text


def _truncate_after(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except ValueError:  # a line cut short by a crash
                continue
    with atomic_open(path) as f:
        f.writelines(keep)


def progress_line(r: dict, max_steps: int) -> str:
    parts = [f"step {r['step']:>6}/{max_steps}"]
    if "loss" in r:
        h, rem = divmod(int(r.get("eta_sec", 0.0)), 3600)
        m, sec = divmod(rem, 60)
        parts += [
            f"loss {r['loss']:.4f}",
            f"lr {r['lr']:.2e}",
            f"grad {r['grad_norm']:.3f}",
            f"{r['tokens_per_sec']:,.0f} tok/s",
            f"mfu {100 * r['mfu']:.2f}%",
            f"eta {h:d}:{m:02d}:{sec:02d}",
        ]
    if "val_loss" in r:
        parts.append(f"val_loss {r['val_loss']:.4f}")
    return " | ".join(parts)


def console(msg: str) -> None:
    """A line for the user on stdout (see the module doc); callers speak on rank 0 only."""
    print(msg, file=sys.stdout, flush=True)
