"""Contract, docs and tests stay in step: these fail when a hook, plugin group, spec key or CLI
command is undocumented, or a hook is never exercised by a test."""

from __future__ import annotations

import inspect
import re

import pytest

import mlk.hookspecs
from mlk.registry import CLASS_GROUPS, GROUPS, Registry
from tests.conftest import ROOT

DOCS = ROOT / "docs"


def hook_names() -> list[str]:
    return [n for n, f in inspect.getmembers(mlk.hookspecs, inspect.isfunction) if n.startswith("mlk_")]


def test_every_hook_has_a_docstring_and_types() -> None:
    for name in hook_names():
        fn = getattr(mlk.hookspecs, name)
        assert fn.__doc__ and len(fn.__doc__.strip()) > 40, f"{name} needs a docstring"
        assert "return" in fn.__annotations__, f"{name} needs a return annotation"


def test_every_hook_and_group_is_in_the_plugin_authoring_guide() -> None:
    guide = (DOCS / "plugin-authoring.md").read_text()
    for name in hook_names():
        assert f"`{name}`" in guide, f"hook {name} is not documented in docs/plugin-authoring.md"
    for group in GROUPS:
        assert f"mlk.{group}" in guide, f"plugin group mlk.{group} is not documented"


def test_every_hook_is_exercised_by_a_test() -> None:
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("*.py"))
    for name in hook_names():
        assert name in sources, f"no test mentions hook {name}"


def test_every_plugin_group_has_a_conformance_suite_or_reason() -> None:
    suites = {p.stem for p in (ROOT / "kernel" / "mlk" / "testing").glob("*.py")}
    for group in CLASS_GROUPS:
        if group in ("datasets", "models"):
            continue  # exercised through the framework suite, which loads data and builds models
        assert {"frameworks": "framework", "searchers": "searcher", "backends": "backend",
                "storage": "storage", "compilers": "compiler", "targets": "target"}[group] in suites


@pytest.fixture
def builtin_registry(monkeypatch: pytest.MonkeyPatch) -> Registry:
    monkeypatch.setenv("MLK_DISABLE_PLUGIN_AUTOLOAD", "1")
    return Registry()


def test_spec_reference_is_generated_from_the_models(builtin_registry: Registry) -> None:
    from mlk.reference import spec_reference_markdown

    expected = spec_reference_markdown(builtin_registry)
    actual = (DOCS / "spec-reference.md").read_text()
    assert actual == expected, (
        "docs/spec-reference.md is out of date: regenerate it with "
        "`MLK_DISABLE_PLUGIN_AUTOLOAD=1 .venv/bin/mlk spec reference > docs/spec-reference.md`")


def test_every_spec_key_has_a_description(builtin_registry: Registry) -> None:
    text = (DOCS / "spec-reference.md").read_text()
    undocumented = [line for line in text.splitlines() if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert not undocumented, "spec keys without a description:\n" + "\n".join(undocumented)


def test_readme_documents_every_cli_command() -> None:
    readme = (ROOT / "README.md").read_text()
    from mlk.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for verb, sp in sub.choices.items():
        nested = [a for a in sp._actions if getattr(a, "choices", None) and a.dest.endswith("_command")]
        if nested:
            for action in nested[0].choices:
                assert re.search(rf"mlk {verb} {action}\b", readme), f"README lacks `mlk {verb} {action}`"
        else:
            assert f"mlk {verb}" in readme, f"README lacks `mlk {verb}`"


def test_readme_starts_with_the_two_commands() -> None:
    head = (ROOT / "README.md").read_text()[:1200]
    assert "make setup && .venv/bin/mlk run +spec=" in head and "make test" in head


def test_architecture_names_every_kernel_module() -> None:
    arch = (DOCS / "architecture.md").read_text()
    for path in sorted((ROOT / "kernel" / "mlk").glob("*.py")):
        if path.stem.startswith("_"):
            continue
        assert f"{path.stem}.py" in arch, f"docs/architecture.md does not describe kernel/mlk/{path.name}"
