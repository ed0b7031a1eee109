"""docs/configuration.md's reference section, generated from the schema.

Every key of the config tree (the dataclasses of megagpt/config.py) with its
type, its default and its description.  A key's description is the `#`
comment lines directly above its field, joined into one line; a dataclass's
docstring describes its group.  A key's default is what a run gets with no
overrides: the schema's default, or the value that the group's default preset
(the one conf/config.yaml composes) sets.  The two must agree, or a reader of
the schema is misled.  Each group's presets (conf/<group>/*.yaml) are listed
with what they set.

    python -m megagpt.config_reference          rewrite the section
    python -m megagpt.config_reference --check  one line per problem, exit 1

The problems: the page's section differs from what the schema and the presets
give now; a key or a group has no description; a default preset sets a value
other than the schema's default; a preset sets a key the schema does not have.
Only the section between BEGIN and END is written.  The rest of the page is
hand-written and kept as it is.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

from megagpt import config as schema
from megagpt.atomic import write_text

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "configuration.md"
CONF_DIR = REPO / "conf"
COMMAND = "python -m megagpt.config_reference"
BEGIN = f"<!-- BEGIN GENERATED: {COMMAND} -->"
END = "<!-- END GENERATED -->"
# The page when it does not exist yet: a title and a paragraph above the section.
INTRO = """# Configuration

megagpt is configured with Hydra: the typed schema in megagpt/config.py, one
preset per group from conf/ (`model=llama-1b`, `data=webdataset`, ...) and
overrides on the command line (`trainer.max_steps=50`).  The reference below
lists every key with its type, its default and what it does.
"""
# The groups (Config's fields) in the page's order.
ORDER = ("run", "model", "data", "optim", "deepspeed", "logger", "trainer", "export")


@dataclass
class Key:
    name: str  # the full key: trainer.max_steps
    type: str  # as a user writes it: int, list of str, int | null
    default: Any  # what a run gets with no overrides; MISSING: required
    schema_default: Any
    description: str  # "" where the field has no comment
    line: int  # the field's line in megagpt/config.py


@dataclass
class Preset:
    name: str
    path: Path
    about: str  # the file's leading comment
    values: dict[str, Any]  # what it sets (its `defaults` list left out)


@dataclass
class Group:
    name: str  # run, data.sources[]
    schema: type
    description: str  # the dataclass's docstring, one line
    line: int
    keys: list[Key]
    presets: list[Preset]  # conf/<name>/*.yaml; none for groups without a folder
    default_preset: str | None  # the one conf/config.yaml composes


def schema_source() -> tuple[Path, str]:
    path = Path(inspect.getsourcefile(schema))
    return path, path.read_text()


def comments(source: str) -> dict[str, tuple[str, int, dict[str, tuple[str, int]]]]:
    """{class: (docstring, line, {field: (comment, line)})} read from the
    schema's source.  A field's comment is the `#` lines directly above it,
    joined, with runs of spaces made one; "" where there are none."""
    lines = source.splitlines()
    found = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = {}
        for statement in node.body:
            if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                above, i = [], statement.lineno - 2  # the line above, 0-based
                while i >= 0 and lines[i].lstrip().startswith("#"):
                    above.insert(0, lines[i].lstrip()[1:])
                    i -= 1
                fields[statement.target.id] = (" ".join(" ".join(above).split()), statement.lineno)
        found[node.name] = (" ".join((ast.get_docstring(node) or "").split()), node.lineno, fields)
    return found


def presets(conf_dir: Path) -> dict[str, tuple[str | None, list[Preset]]]:
    """{group: (default preset, presets)} for each folder of `conf_dir`; the
    default is the one conf/config.yaml's defaults list picks."""
    root = OmegaConf.to_container(OmegaConf.load(conf_dir / "config.yaml"), resolve=False)
    chosen = {}
    for entry in root.get("defaults", []):
        if isinstance(entry, dict) and len(entry) == 1:
            ((group, name),) = entry.items()
            if (conf_dir / group).is_dir():
                chosen[group] = name
    found = {}
    for folder in sorted(p for p in conf_dir.iterdir() if p.is_dir()):
        group = []
        for path in sorted(folder.glob("*.yaml")):
            values = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
            values.pop("defaults", None)
            header = []
            for line in path.read_text().splitlines():
                if not line.startswith("#"):
                    break
                header.append(line[1:])
            group.append(Preset(path.stem, path, " ".join(" ".join(header).split()), values))
        found[folder.name] = (chosen.get(folder.name), group)
    return found


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return MISSING if f.default is dataclasses.MISSING else f.default


def _item_schema(hint: Any) -> type | None:
    """The dataclass of a list-of-dataclasses field (data.sources), else None."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def type_name(hint: Any, items: dict[type, str]) -> str:
    """A type as a user writes it: int, list of str, int | null.  `items`:
    the group name of each dataclass a list holds."""
    if hint is Any:
        return "any"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        names = [type_name(a, items) for a in args if a is not type(None)]
        return " | ".join(names + (["null"] if type(None) in args else []))
    if origin is list:
        return "list of " + (type_name(args[0], items) if args else "any")
    if hint in items:
        return f"{items[hint]} items"
    return hint.__name__


def groups(source: str | None = None, conf_dir: Path = CONF_DIR) -> list[Group]:
    """The groups of the config tree in the page's order, each list of
    dataclasses (data.sources[]) right after its parent.  `source`: the
    schema's source text, where the comments are read (default: the file)."""
    notes = comments(schema_source()[1] if source is None else source)
    found = presets(conf_dir)
    hints = typing.get_type_hints(schema.Config)
    out = []

    def add(name: str, cls: type, preset_group: str | None) -> None:
        default_preset, group_presets = found.get(preset_group, (None, []))
        chosen = next((p for p in group_presets if p.name == default_preset), None)
        doc, line, fields = notes.get(cls.__name__, ("", 0, {}))
        field_hints = typing.get_type_hints(cls)
        items = {}
        for f in dataclasses.fields(cls):
            item = _item_schema(field_hints[f.name])
            if item is not None:
                items[item] = f"{name}.{f.name}[]"
        keys = []
        for f in dataclasses.fields(cls):
            default = _default(f)
            composed = chosen.values[f.name] if chosen is not None and f.name in chosen.values else default
            text, field_line = fields.get(f.name, ("", line))
            keys.append(
                Key(f"{name}.{f.name}", type_name(field_hints[f.name], items), composed, default, text, field_line)
            )
        out.append(Group(name, cls, doc, line, keys, group_presets, default_preset))
        for item, item_name in items.items():
            add(item_name, item, None)

    for name in ORDER:
        if name in hints:  # (one that is not: description_problems names it)
            add(name, hints[name], name)
    return out


def show(value: Any) -> str:
    """A value as it is written in YAML or on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return value if value else '""'
    return repr(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def description_problems(found: list[Group], schema_path: Path) -> list[str]:
    """One line per group of the config tree left out of the page, per group
    without a docstring and per key without a comment."""
    where = _relative(schema_path)
    names = [f.name for f in dataclasses.fields(schema.Config)]
    out = [
        f"{where}: Config.{name} is not in megagpt/config_reference.py's ORDER: add it"
        for name in names
        if name not in ORDER
    ]
    out += [
        f"megagpt/config_reference.py: ORDER names {name}, which Config does not have"
        for name in ORDER
        if name not in names
    ]
    for group in found:
        if not group.description:
            out.append(
                f"{where}:{group.line}: {group.schema.__name__} has no docstring to describe the {group.name} group"
            )
        for key in group.keys:
            if not key.description:
                out.append(
                    f"{where}:{key.line}: {key.name} has no description: write it as # comment lines "
                    "directly above the field"
                )
    return out


def preset_problems(found: list[Group], schema_path: Path, conf_dir: Path = CONF_DIR) -> list[str]:
    """One line per value a default preset sets that is not the schema's
    default (runs get the preset's: the schema would mislead its reader), and
    per key a preset sets that the schema does not have."""
    where = _relative(schema_path)
    out = []
    for group in found:
        fields = {key.name.rpartition(".")[2]: key for key in group.keys}
        if group.default_preset is not None and group.default_preset not in [p.name for p in group.presets]:
            out.append(
                f"{_relative(conf_dir / 'config.yaml')}: the default preset {group.name}="
                f"{group.default_preset} has no file conf/{group.name}/{group.default_preset}.yaml"
            )
        for preset in group.presets:
            for name, value in preset.values.items():
                key = fields.get(name)
                if key is None:
                    out.append(
                        f"{_relative(preset.path)}: {group.name}.{name} is not a key of the schema "
                        f"({group.schema.__name__})"
                    )
                elif preset.name == group.default_preset and not _same(value, key.schema_default):
                    out.append(
                        f"{_relative(preset.path)}: {key.name} is {show(value)} here and "
                        f"{show(key.schema_default)} in the schema ({where}:{key.line}); "
                        f"{group.name}={preset.name} is composed by default, so runs get {show(value)}: "
                        "make the schema's default the same"
                    )
    return out


def _escape(text: str) -> str:
    """Text for a Markdown table cell: pipes escaped everywhere (code spans
    too), `<` outside code spans, so that <run.dir> is not taken for HTML."""
    parts = text.split("`")
    return "`".join(
        p.replace("|", "\\|") if i % 2 else p.replace("|", "\\|").replace("<", "\\<") for i, p in enumerate(parts)
    )


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    kept = "".join(c for c in heading.lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def _heading(group: Group) -> str:
    return f"{group.name} items" if group.name.endswith("[]") else group.name


def render(found: list[Group]) -> str:
    """The generated section's text (between the markers), ending in a newline."""
    defaults = ", ".join(f"{g.name}={g.default_preset}" for g in found if g.default_preset)
    lines = [
        "## Reference",
        "",
        f"Generated by `{COMMAND}` from the schema, megagpt/config.py (each key's description is the comment "
        "above its field, each group's the dataclass's docstring), and the presets under conf/: edit those, "
        "then run it; tests/test_config_reference.py fails while this section is stale.",
        "",
        "A default is what a run gets with no overrides: conf/config.yaml composes the schema with one preset "
        f"of each group ({defaults}), and those presets set only the schema's defaults. `null` is Python's "
        "None; a key marked required has no default.",
        "",
        " · ".join(f"[{_heading(g)}](#{_anchor(_heading(g))})" for g in found),
    ]
    for group in found:
        lines += [
            "",
            f"### {_heading(group)}",
            "",
            _escape(group.description),
            "",
            "| key | type | default | description |",
            "| --- | --- | --- | --- |",
        ]
        for key in group.keys:
            default = "required" if key.default is MISSING else f"`{_escape(show(key.default))}`"
            lines.append(f"| `{key.name}` | `{_escape(key.type)}` | {default} | {_escape(key.description)} |")
        if group.presets:
            lines += [
                "",
                f"Presets: `{group.name}=<name>` composes conf/{group.name}/<name>.yaml over the "
                f"schema; the default is `{group.default_preset}`.",
                "",
                "| preset | what it is | sets |",
                "| --- | --- | --- |",
            ]
            for preset in group.presets:
                name = f"`{preset.name}`" + (" (default)" if preset.name == group.default_preset else "")
                sets = ", ".join(f"`{_escape(f'{k}={show(v)}')}`" for k, v in preset.values.items())
                lines.append(f"| {name} | {_escape(preset.about)} | {sets or 'nothing'} |")
    return "\n".join(lines) + "\n"


def section(body: str) -> str:
    return f"{BEGIN}\n{body}{END}"


def splice(page: str | None, body: str) -> str:
    """The page with its generated section replaced by `body`; everything
    outside the markers kept.  No page yet: INTRO, then the section.  A page
    without markers gets the section at its end."""
    if page is None:
        return f"{INTRO}\n{section(body)}\n"
    start = page.find(BEGIN)
    end = page.find(END, start + len(BEGIN)) if start >= 0 else -1
    if start < 0 or end < 0:
        return page.rstrip("\n") + f"\n\n{section(body)}\n"
    return page[:start] + section(body) + page[end + len(END) :]


def page_problems(page_path: Path, body: str) -> list[str]:
    where = _relative(page_path)
    if not page_path.is_file():
        return [f"{where}: missing; run {COMMAND}"]
    page = page_path.read_text()
    start = page.find(BEGIN)
    end = page.find(END, start + len(BEGIN)) if start >= 0 else -1
    if start < 0 or end < 0:
        return [f"{where}: no generated section (the lines {BEGIN} and {END}); run {COMMAND}"]
    current, wanted = page[start : end + len(END)], section(body)
    if current == wanted:
        return []
    first = next(
        (i for i, (a, b) in enumerate(zip(current.splitlines(), wanted.splitlines())) if a != b),
        min(len(current.splitlines()), len(wanted.splitlines())),
    )
    line = page[:start].count("\n") + first + 1
    return [f"{where}:{line}: the generated section is stale (the schema or conf/ changed); run {COMMAND}"]


def check(page_path: Path = PAGE, conf_dir: Path = CONF_DIR, source: str | None = None) -> list[str]:
    """Every problem, one line each; [] when the page is current and the schema sound."""
    schema_path, text = schema_source()
    found = groups(text if source is None else source, conf_dir)
    return (
        description_problems(found, schema_path)
        + preset_problems(found, schema_path, conf_dir)
        + page_problems(page_path, render(found))
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--check", action="store_true", help="write nothing; print one line per problem and exit 1 if there is any"
    )
    args = p.parse_args(argv)
    if args.check:
        problems = check()
    else:
        schema_path, text = schema_source()
        found = groups(text)
        PAGE.parent.mkdir(parents=True, exist_ok=True)
        page = splice(PAGE.read_text() if PAGE.is_file() else None, render(found))
        write_text(PAGE, page)
        problems = description_problems(found, schema_path) + preset_problems(found, schema_path)
        print(f"wrote {_relative(PAGE)}")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
