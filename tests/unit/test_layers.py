"""The layers point one way. Every ``import`` in the source (module level or inside a function)
is read with ``ast`` and held against the rules below; a new arrow that runs back up fails here.

    gpumeter core (contract, settings, errors, CLI root)   imports none of agent, pipeline, billing
    agent                                                  imports the core only
    pipeline                                               imports the core (never billing)
    billing core (billing.core)                            imports nothing of I/O or of other packages
    gpumeter.demo                                          may import everything: it composes them

The CLI root (``gpumeter.cli``) names its command groups by string and loads them lazily, so a
GPU host without the extras runs the agent; that table is the core's one dynamic import, and any
other ``importlib.import_module`` or ``__import__`` in the source fails here. Below the static
walk, a fresh interpreter imports the billing core and checks what it pulled in.
"""

from __future__ import annotations

import ast
import subprocess
import sys
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
            "io",
            "socket",
            "subprocess",
            "urllib",
            "http",
            "shutil",
            "tempfile",
        ),
        "the settlement core is pure: facts in, results out",
    ),
    (
        "billing.app",
        (
            "billing.cli",
            "click",
            "pipeline",
            "clickhouse_connect",
            "sqlite3",
            "psycopg",
            "billing.adapters.clickhouse_usage",
        ),
        "the application reaches usage and the store through ports and adapters, never the CLI",
    ),
)
EXEMPT = ("gpumeter.demo",)  # the one composition root below gpumeter


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


DYNAMIC_IMPORTS = {"gpumeter.cli"}  # the lazy command-group table


def imports_of(source: str, module: str, package: bool = False) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import statement, relative ones resolved against ``module``
    (a package's ``__init__`` when ``package``); a dynamic import is reported as ``<dynamic>`` or,
    with a constant name, as that name."""
    parts = module.split(".")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__"):
                arg = node.args[0] if node.args else None
                constant = isinstance(arg, ast.Constant) and isinstance(arg.value, str)
                yield node.lineno, arg.value if constant else "<dynamic>"  # type: ignore[union-attr]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = parts[: len(parts) - node.level + (1 if package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            for alias in node.names:  # "from billing import state" imports billing.state
                yield node.lineno, f"{base}.{alias.name}"


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(module: str, source: str, package: bool = False) -> list[str]:
    out = []
    found = list(imports_of(source, module, package))
    if module not in DYNAMIC_IMPORTS:
        out += [f"{module}:{line} imports a module by a computed name" for line, name in found if name == "<dynamic>"]
    for prefix, forbidden, why in RULES:
        if not _under(module, prefix) or any(_under(module, e) for e in EXEMPT if not _under(prefix, e)):
            continue
        for line, name in found:
            for bad in forbidden:
                if _under(name, bad):
                    out.append(f"{module}:{line} imports {name} ({prefix} -/-> {bad}: {why})")
    return sorted(set(out))


def source_files() -> Iterator[Path]:
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def test_the_walk_sees_every_package() -> None:
    names = {module_name(p) for p in source_files()}
    assert {"agent.windows", "pipeline.loader", "billing.cli", "gpumeter.record", "gpumeter.demo.cli"} <= names


def test_no_import_runs_against_the_layers() -> None:
    found = [
        v
        for path in source_files()
        for v in violations(module_name(path), path.read_text(), package=path.name == "__init__.py")
    ]
    assert found == []


def test_the_billing_core_pulls_in_no_io_when_imported() -> None:
    """What the static walk cannot see: modules imported by the core's own imports."""
    probe = (
        "import sys\n"
        "import billing.core.fastpath, billing.core.invoicing, billing.core.ledger, billing.core.model\n"
        "import billing.core.money, billing.core.netting, billing.core.pricing, billing.core.statement\n"
        "print(' '.join(sorted(sys.modules)))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    io_or_other = ("pipeline", "agent", "sqlite3", "psycopg", "clickhouse_connect", "kafka", "click", "socket",
                   "subprocess", "billing.app", "billing.adapters", "billing.cli", "gpumeter.demo")  # fmt: skip
    assert [m for m in loaded if any(_under(m, bad) for bad in io_or_other)] == []


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
        (
            "billing.app.reports",
            "from billing.adapters.clickhouse_usage import ClickHouseUsage\n",
            "billing.app.reports:1 imports billing.adapters.clickhouse_usage",
        ),
        ("gpumeter", "import gpumeter.demo.cli\n", "gpumeter:1 imports gpumeter.demo"),
        (
            "pipeline.usage_store",
            "import importlib\nimportlib.import_module('billing.cli')\n",
            "pipeline.usage_store:2 imports billing.cli",
        ),
        ("agent.runner", "m = 'pipeline'\n__import__(m)\n", "agent.runner:2 imports a module by a computed name"),
    ],
    ids=[
        "pipeline-billing",
        "agent-pipeline-in-a-function",
        "core-agent",
        "core-demo-relative",
        "billing-core-io",
        "billing-core-adapters",
        "billing-app-cli",
        "billing-app-clickhouse",
        "core-init-demo",
        "import-module-constant",
        "dunder-import-computed",
    ],
)
def test_each_rule_catches_its_arrow(module: str, source: str, expected: str) -> None:
    assert any(v.startswith(expected) for v in violations(module, source)), violations(module, source)


def test_a_relative_import_in_a_package_init_resolves_inside_the_package() -> None:
    assert next(iter(imports_of("from .demo import broker\n", "gpumeter", package=True))) == (1, "gpumeter.demo")
    assert violations("gpumeter", "from .demo import broker\n", package=True)


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
