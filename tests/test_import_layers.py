"""Imports flow one way: config -> model | data -> engine -> loop -> export and
the entry points, with small leaf utilities beneath them all.  Read from the
source with `ast` (every import, also those inside functions; those under
`if TYPE_CHECKING:` are annotations only and not counted): no module imports
from a higher layer, no cycle exists, model/ and data/ never touch
torch.distributed or DeepSpeed, and nothing outside the engine package
(megagpt/engine/) imports DeepSpeed or runs one of its modules."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "megagpt"
ENGINE = PACKAGE / "engine"  # DeepSpeed's one boundary

# Lowest first.  A module may import its own layer and the ones below.
LAYERS = [
    (
        "leaves",
        [
            "megagpt.atomic",
            "megagpt.collectives",
            "megagpt.runtime",
            "megagpt.flops",
            "megagpt.profiling",
            "megagpt.resilience",
            "megagpt.metrics",
            "megagpt.run_lock",
        ],
    ),
    ("config", ["megagpt.config"]),
    ("model", ["megagpt.model"]),
    ("data", ["megagpt.data"]),
    ("checks", ["megagpt.config_checks", "megagpt.config_reference"]),
    ("engine", ["megagpt.engine"]),
    ("loop", ["megagpt.state", "megagpt.checkpoint", "megagpt.resume_check", "megagpt.hooks", "megagpt.loop"]),
    ("export", ["megagpt.hf", "megagpt.hf_import", "megagpt.export", "megagpt.export_gguf", "megagpt.generate"]),
    ("entry", ["megagpt.run", "megagpt.cli_checks", "megagpt.train", "megagpt.bench"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def imports(path: Path) -> set[str]:
    """Every module imported by the file, as full names (megagpt's resolved to modules)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / (full.replace(".", "/") + ".py")).exists() or (
                    PACKAGE.parent / full.replace(".", "/")
                ).is_dir()
                found.add(full if is_module else node.module)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports(path) if m.startswith("megagpt") and m != name} for name, path in modules.items()}


def test_no_module_imports_from_a_higher_layer():
    upward = [
        f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
        for m, deps in sorted(graph().items())
        for d in sorted(deps)
        if layer_of(d) > layer_of(m)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_model_and_data_never_touch_torch_distributed_or_deepspeed():
    offenders = []
    for path in [*(PACKAGE / "model").rglob("*.py"), *(PACKAGE / "data").rglob("*.py")]:
        bad = {m for m in imports(path) if m.startswith(("torch.distributed", "deepspeed"))}
        if bad:
            offenders.append(f"{module_name(path)}: {sorted(bad)}")
    assert not offenders, offenders


def deepspeed_modules_named(path: Path) -> set[str]:
    """The string constants in the file that name one of DeepSpeed's modules (as
    `python -m deepspeed.checkpoint.ds_to_universal` or importlib would take
    them), found among DeepSpeed's files without importing it.  Config keys
    such as "deepspeed.zero_stage" name none."""
    spec = importlib.util.find_spec("deepspeed")  # a top-level package: found, not imported
    root = Path(spec.origin).parent
    named = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and re.fullmatch(r"deepspeed(\.\w+)+", node.value)
        ):
            where = root.joinpath(*node.value.split(".")[1:])
            if where.with_suffix(".py").is_file() or where.is_dir():
                named.add(node.value)
    return named


def test_only_the_engine_touches_deepspeed():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if ENGINE in path.parents:
            continue
        bad = {m for m in imports(path) if m == "deepspeed" or m.startswith("deepspeed.")}
        bad |= deepspeed_modules_named(path)
        if bad:
            offenders.append(f"{module_name(path)}: {sorted(bad)}")
    assert not offenders, "DeepSpeed outside megagpt/engine/: " + "; ".join(offenders)
    # The same reading finds DeepSpeed inside the engine, where it belongs.
    assert "deepspeed" in imports(ENGINE / "build.py")
    assert deepspeed_modules_named(ENGINE / "checkpoint_files.py") == {"deepspeed.checkpoint.ds_to_universal"}


def test_the_checks_see_every_kind_of_import():
    """The reader finds imports inside functions, and not those under TYPE_CHECKING."""
    found = imports(PACKAGE / "hooks.py")
    assert "megagpt.collectives" in found and "megagpt.loop" not in found
    assert "megagpt.export" in imports(PACKAGE / "run.py")  # imported inside Run.finish
