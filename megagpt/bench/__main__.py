"""`python -m megagpt.bench WHAT ...`: see megagpt/bench/__init__.py."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import megagpt.bench as bench

# Each benchmark module has add_parser(subparsers), registering a `run(args) -> dict`.
MODULES = ("data", "train", "scaling", "memory", "cost", "gpu", "prepare", "compile")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m megagpt.bench", description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="what", required=True)
    for name in MODULES:
        try:
            module = importlib.import_module(f"megagpt.bench.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"megagpt.bench.{name}":
                raise
            continue
        module.add_parser(sub)
    args = p.parse_args(argv)
    result = args.run(args)
    if getattr(args, "json", None):
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
