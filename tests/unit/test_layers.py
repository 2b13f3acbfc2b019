"""The layers point one way. Every ``import`` in the source (module level or inside a function)
is read with ``ast`` and held against the rules below; a new arrow that runs back up fails here.

    gpumeter core (contract, settings, errors, CLI root)   imports none of agent, pipeline, billing
    agent                                                  imports the core only
    pipeline                                               imports the core (never billing)
    billing core (billing.core)                            imports nothing of I/O or of other packages
    gpumeter.demo                                          may import everything: it composes them
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gpumeter", "agent", "pipeline", "billing")

# (module prefix, forbidden import prefixes, why)
RULES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("agent", ("pipeline", "billing", "gpumeter.demo"), "the agent's base install has no pipeline or billing"),
    ("pipeline", ("billing", "agent", "gpumeter.demo"), "the usage store serves billing; it never depends on it"),
    ("gpumeter", ("agent", "pipeline", "billing", "gpumeter.demo"), "the core is what every package builds on"),
    (
        "billing.core",
        (
            "billing.app",
            "billing.adapters",
            "billing.cli",
            "pipeline",
            "agent",
            "gpumeter.demo",
            "sqlite3",
            "psycopg",
            "clickhouse_connect",
            "kafka",
            "click",
            "os",
            "time",
            "pathlib",
        ),
        "the settlement core is pure: facts in, results out",
    ),
    (
        "billing.app",
        ("billing.cli", "click", "pipeline", "clickhouse_connect", "sqlite3", "psycopg"),
        "the application reaches usage and the store through ports and adapters, never the CLI",
    ),
)
EXEMPT = ("gpumeter.demo",)  # the one composition root below gpumeter


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import statement, relative ones resolved against ``module``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: -node.level]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            for alias in node.names:  # "from billing import state" imports billing.state
                yield node.lineno, f"{base}.{alias.name}"


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(module: str, source: str) -> list[str]:
    out = []
    for prefix, forbidden, why in RULES:
        if not _under(module, prefix) or any(_under(module, e) for e in EXEMPT if not _under(prefix, e)):
            continue
        for line, name in imports_of(source, module):
            for bad in forbidden:
                if _under(name, bad) and not _under(name, module):
                    out.append(f"{module}:{line} imports {name} ({prefix} -/-> {bad}: {why})")
    return sorted(set(out))


def source_files() -> Iterator[Path]:
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def test_the_walk_sees_every_package() -> None:
    names = {module_name(p) for p in source_files()}
    assert {"agent.windows", "pipeline.loader", "billing.cli", "gpumeter.record", "gpumeter.demo.cli"} <= names


def test_no_import_runs_against_the_layers() -> None:
    found = [v for path in source_files() for v in violations(module_name(path), path.read_text())]
    assert found == []


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("pipeline.loader", "from billing.core import money\n", "pipeline.loader:1 imports billing.core"),
        ("agent.sender", "def f():\n    import pipeline.clickhouse\n", "agent.sender:2 imports pipeline.clickhouse"),
        ("gpumeter.settings", "from agent import windows\n", "gpumeter.settings:1 imports agent"),
        ("gpumeter.record", "from .demo import broker\n", "gpumeter.record:1 imports gpumeter.demo"),
        ("billing.core.netting", "import sqlite3\n", "billing.core.netting:1 imports sqlite3"),
        ("billing.core.netting", "from ..adapters import state\n", "billing.core.netting:1 imports billing.adapters"),
        ("billing.app.settle", "import click\n", "billing.app.settle:1 imports click"),
    ],
    ids=[
        "pipeline-billing",
        "agent-pipeline-in-a-function",
        "core-agent",
        "core-demo-relative",
        "billing-core-io",
        "billing-core-adapters",
        "billing-app-cli",
    ],
)
def test_each_rule_catches_its_arrow(module: str, source: str, expected: str) -> None:
    assert any(v.startswith(expected) for v in violations(module, source)), violations(module, source)


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("gpumeter.demo.cli", "from billing.app import settle\nfrom agent.runner import Agent\n"),
        ("billing.adapters.usage", "from pipeline.usage_store import UsageStore\n"),
        ("pipeline.loader", "from gpumeter.record import decode_batch\n"),
    ],
    ids=["demo-composes", "billing-adapter-reads-the-store", "pipeline-core"],
)
def test_allowed_arrows_pass(module: str, source: str) -> None:
    assert violations(module, source) == []
