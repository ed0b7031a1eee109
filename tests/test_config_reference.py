"""docs/configuration.md's reference section, generated from the schema
(megagpt/config_reference.py).  The tests fail when the committed page is
stale, when a key or a group has no description, when a default preset (the
one conf/config.yaml composes) sets a value other than the schema's default,
or when a preset sets a key the schema does not have.  The last tests show
the checker catching each of these on altered copies of the schema, the
presets and the page.

The model group needs no exemption: its default preset, tiny, sets family,
n_layer, n_head, n_embd and attention to ModelConfig's own defaults, so the
schema describes the model a run gets.  The other presets (llama-1b, zero0,
data=webdataset, ...) differ from the schema by design; they may set only
keys it has.
"""

from __future__ import annotations

import ast
import shutil

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import megagpt.config
from megagpt import config_reference as reference


def _problems_text(problems: list[str]) -> str:
    return "\n" + "\n".join(problems)


def test_the_committed_page_is_current():
    problems = reference.page_problems(reference.PAGE, reference.render(reference.groups()))
    assert not problems, _problems_text(problems)


def test_every_group_and_key_has_a_description():
    problems = reference.description_problems(reference.groups(), reference.schema_source()[0])
    assert not problems, _problems_text(problems)


def test_default_presets_set_the_schema_defaults_and_presets_only_its_keys():
    problems = reference.preset_problems(reference.groups(), reference.schema_source()[0])
    assert not problems, _problems_text(problems)


def test_the_defaults_listed_are_what_hydra_composes():
    """The page's defaults, read from the schema and the YAML files, are what
    Hydra composes with no overrides, written the same way; and the page
    lists every key of that config."""
    megagpt.config.register()
    with initialize_config_dir(config_dir=str(reference.CONF_DIR), version_base=None):
        composed = OmegaConf.to_container(compose("config"))
    listed = 0
    for group in reference.groups():
        if group.name.endswith("[]"):  # list items: no item exists by default
            continue
        for key in group.keys:
            section, name = key.name.split(".")
            value = composed[section][name]
            assert reference.show(value) == reference.show(key.default), (key.name, value, key.default)
            listed += 1
    assert listed == sum(len(v) for v in composed.values())


def test_the_check_command_passes():
    assert reference.main(["--check"]) == 0


# --- the checker catches what it should --------------------------------------


def _groups_from(source: str, conf_dir=reference.CONF_DIR):
    return reference.groups(source, conf_dir)


def _key(name: str, found=None) -> reference.Key:
    return next(k for g in (found or reference.groups()) for k in g.keys if k.name == name)


def _edit_comment(source: str, name: str, edit) -> str:
    """The schema's source with the comment lines above key `name`'s field
    replaced by edit(those lines)."""
    lines = source.splitlines(keepends=True)
    end = _key(name).line - 1  # the field's line, 0-based
    start = end
    while lines[start - 1].lstrip().startswith("#"):
        start -= 1
    return "".join(lines[:start] + edit(lines[start:end]) + lines[end:])


def test_a_stale_page_is_caught(tmp_path):
    path, source = reference.schema_source()
    # A comment edited after the page was generated.
    edited = _edit_comment(source, "model.n_layer", lambda comment: comment + ["    # One more line.\n"])
    problems = reference.page_problems(reference.PAGE, reference.render(_groups_from(edited)))
    assert len(problems) == 1 and "the generated section is stale" in problems[0], problems
    row = next(i for i, line in enumerate(reference.PAGE.read_text().splitlines(), 1) if "`model.n_layer`" in line)
    assert problems[0].startswith(f"docs/configuration.md:{row}: "), problems

    body = reference.render(reference.groups())
    assert reference.page_problems(tmp_path / "configuration.md", body) == [
        f"{tmp_path / 'configuration.md'}: missing; run python -m megagpt.config_reference"
    ]
    (tmp_path / "configuration.md").write_text("# Configuration\n\nNo section yet.\n")
    assert "no generated section" in reference.page_problems(tmp_path / "configuration.md", body)[0]


def _without_docstring(source: str, cls: str) -> str:
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == cls)
    lines = source.splitlines(keepends=True)
    return "".join(lines[: node.body[0].lineno - 1] + lines[node.body[0].end_lineno :])


def test_a_key_or_group_without_a_description_is_caught():
    path, source = reference.schema_source()
    bare = _without_docstring(_edit_comment(source, "model.n_layer", lambda comment: []), "OptimConfig")
    problems = reference.description_problems(_groups_from(bare), path)
    assert len(problems) == 2, problems
    assert problems[0].startswith("megagpt/config.py:") and "model.n_layer has no description" in problems[0]
    assert "OptimConfig has no docstring to describe the optim group" in problems[1]
    # A comment that ends a line of code does not describe the next field.
    assert reference.comments("class A:\n    x: int = 1  # one\n    y: int = 2\n")["A"][2]["y"] == ("", 3)


def test_a_default_preset_that_disagrees_or_a_preset_key_the_schema_lacks_is_caught(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(reference.CONF_DIR, conf)
    default = conf / "trainer" / "default.yaml"
    schema_value = _key("trainer.eval_every").schema_default
    preset = OmegaConf.load(default)
    preset.eval_every = schema_value + 7
    OmegaConf.save(preset, default)
    llama = conf / "model" / "llama-1b.yaml"
    llama.write_text(llama.read_text() + "n_layers: 2\n")
    # A non-default preset may differ from the schema: zero0 already does (zero_stage=0).
    path, source = reference.schema_source()
    problems = reference.preset_problems(_groups_from(source, conf), path, conf)
    assert len(problems) == 2, problems
    assert problems[0] == f"{llama}: model.n_layers is not a key of the schema (ModelConfig)"
    assert problems[1].startswith(
        f"{default}: trainer.eval_every is {schema_value + 7} here and {schema_value} in the schema (megagpt/config.py:"
    )
    assert "trainer=default is composed by default" in problems[1]
    # What a run gets is the preset's value, and the page would say so.
    eval_every = _key("trainer.eval_every", _groups_from(source, conf))
    assert (eval_every.default, eval_every.schema_default) == (schema_value + 7, schema_value)


def test_the_section_is_replaced_and_the_rest_of_the_page_kept():
    body = "## Reference\n\nnew\n"
    old = f"# Guide\n\nHand-written.\n\n{reference.BEGIN}\nold\n{reference.END}\n\n## After\n"
    assert (
        reference.splice(old, body)
        == f"# Guide\n\nHand-written.\n\n{reference.BEGIN}\n## Reference\n\nnew\n{reference.END}\n\n## After\n"
    )
    created = reference.splice(None, body)
    assert created.startswith(reference.INTRO) and created.endswith(f"{reference.BEGIN}\n{body}{reference.END}\n")
    assert reference.splice("# Guide\n", body) == f"# Guide\n\n{reference.BEGIN}\n{body}{reference.END}\n"
