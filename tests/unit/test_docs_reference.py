"""The docs stay true to the code: examples are the real files, docs/cli.md is current, rule
citations name rules that exist, the READMEs point only inside the repository, and the example
files load through the loaders that read them."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import re
import tomllib
from datetime import date, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
RULES = DOCS / "billing-rules.md"
FORMATS = DOCS / "file-formats.md"

EXAMPLE_BLOCK = re.compile(r"<!-- example: (?P<path>\S+) -->\n```[\w-]*\n(?P<body>.*?)```\n", re.DOTALL)
RULE = re.compile(r"^\*\*(\d+)\.(\d+) [^*]+\.\*\*", re.MULTILINE)
SECTION = re.compile(r"^## (\d+)\. ", re.MULTILINE)
CITATION = re.compile(r"docs/billing-rules\.md (\d+\.\d+)")
SKIPPED_DIRS = {".git", ".venv", "venv", "build", "dist", "node_modules"}


def example_blocks() -> list[tuple[str, str]]:
    return [(m["path"], m["body"]) for m in EXAMPLE_BLOCK.finditer(FORMATS.read_text())]


def rule_numbers() -> list[str]:
    return [f"{m[1]}.{m[2]}" for m in RULE.finditer(RULES.read_text())]


def repo_files(*suffixes: str) -> list[Path]:
    return sorted(
        p
        for p in ROOT.rglob("*")
        if p.suffix in suffixes
        and p.is_file()
        and not any(part in SKIPPED_DIRS or part.endswith((".egg-info", "_cache")) for part in p.parts)
    )


# ---------------------------------------------------------------- (a) examples shown are the files


def test_every_example_block_equals_its_file() -> None:
    blocks = example_blocks()
    assert blocks, "file-formats.md shows no <!-- example: ... --> blocks"
    for path, body in blocks:
        file = ROOT / path
        assert file.is_file(), f"file-formats.md shows {path}, which does not exist"
        assert body == file.read_text(), f"the block shown for {path} in file-formats.md differs from the file"


def test_every_example_file_is_shown() -> None:
    shown = {path for path, _ in example_blocks()}
    files = {str(p.relative_to(ROOT)) for p in EXAMPLES.iterdir() if p.is_file()}
    assert files - shown == set(), "example files that file-formats.md does not show"


# ---------------------------------------------------------------- (b) docs/cli.md is current


def _cli_reference() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "tests" / "cli_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_current() -> None:
    written = (DOCS / "cli.md").read_text() if (DOCS / "cli.md").exists() else ""
    assert written == _cli_reference().render(), "docs/cli.md is stale: run make docs"


# ---------------------------------------------------------------- (c) rule numbers and citations


def test_rules_are_numbered_in_order_within_their_sections() -> None:
    text = RULES.read_text()
    sections = [int(n) for n in SECTION.findall(text)]
    assert sections == list(range(1, len(sections) + 1))
    for number in sections:
        start = text.index(f"\n## {number}. ")
        end = text.find("\n## ", start + 1)
        body = text[start : end if end > 0 else len(text)]
        found = [(int(s), int(r)) for s, r in RULE.findall(body)]
        assert found == [(number, i) for i in range(1, len(found) + 1)], f"section {number} numbers its rules badly"


def test_every_old_decided_rule_has_a_new_number() -> None:
    table = RULES.read_text().split("## Where the old numbering went", 1)[1]
    mapping = dict(re.findall(r"^\| (\d+) \| (\d+\.\d+) \|$", table, re.MULTILINE))
    assert sorted(int(old) for old in mapping) == list(range(1, 25))
    assert set(mapping.values()) <= set(rule_numbers())


def test_every_citation_names_a_rule_that_exists() -> None:
    rules = set(rule_numbers())
    bad = [
        f"{path.relative_to(ROOT)}:{n}: docs/billing-rules.md {cited}"
        for path in repo_files(".py", ".md")
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), start=1)
        for cited in CITATION.findall(line)
        if cited not in rules
    ]
    assert bad == [], "citations of rules that docs/billing-rules.md does not have:\n" + "\n".join(bad)


# ---------------------------------------------------------------- (d) READMEs point inside the repository

READMES = ["README.md", "billing/README.md", "pipeline/README.md", "agent/README.md", "gpumeter/CONTRACT.md"]
OUTSIDE = re.compile(r"/work/|\.\./shared|(?<![\w./-])shared/\S+\.md")
LINK = re.compile(r"\]\(([^)#\s]+)[^)]*\)")


@pytest.mark.parametrize("name", READMES)
def test_readme_points_only_inside_the_repository(name: str) -> None:
    path = ROOT / name
    problems = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        problems += [f"{name}:{n}: {m.group(0)}" for m in OUTSIDE.finditer(line)]
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            resolved = (path.parent / target).resolve()
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                problems.append(f"{name}:{n}: link to {target}, which is not a file of the repository")
    assert problems == [], "paths outside the repository:\n" + "\n".join(problems)


# ---------------------------------------------------------------- the examples are consistent

# The power bound the window checks apply (pipeline/schema.py MAX_WATTS_BY_CLASS), for the classes
# the examples use.
MAX_WATTS = {"H100-80G": 800, "L40S-48G": 400, "A800-80G": 450}
EARLIEST = datetime.fromisoformat("2000-01-01T00:00:00+00:00")


def usage_rows() -> list[dict[str, str]]:
    with (EXAMPLES / "usage.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_usage_example_passes_the_window_checks() -> None:
    rows = usage_rows()
    assert len(rows) == 15
    for line, r in enumerate(rows, start=2):
        start = datetime.fromisoformat(r["window_start"])
        end = datetime.fromisoformat(r["window_end"])
        assert start.tzinfo is not None and end.tzinfo is not None, line
        start_ms = (start - datetime.fromisoformat("1970-01-01T00:00:00+00:00")) // timedelta(milliseconds=1)
        material = "\x1f".join((r["host_id"], r["gpu_uuid"], r["firm_id"], str(start_ms)))
        assert r["record_id"] == hashlib.sha256(material.encode()).hexdigest()[:32], line
        length_s = (end - start).total_seconds()
        allocated = int(r["allocated_seconds"])
        assert start >= EARLIEST and end > start, line
        assert 0 <= allocated <= length_s, line
        if r["busy_seconds"]:
            assert 0 <= float(r["busy_seconds"]) <= allocated, line
        if r["energy_joules"]:
            assert 0 <= float(r["energy_joules"]) <= MAX_WATTS[r["gpu_class"]] * length_s, line
        assert r["provider_id"] == r["host_id"].split("-")[0], f"line {line}: host of another provider"


def test_rate_card_prices_every_usage_row() -> None:
    card = tomllib.loads((EXAMPLES / "rates.toml").read_text())
    zone = card["timezone"]
    from zoneinfo import ZoneInfo

    for r in usage_rows():
        day = datetime.fromisoformat(r["window_start"]).astimezone(ZoneInfo(zone)).date()
        in_effect = [
            rate for rate in card["rate"] if rate["gpu_class"] == r["gpu_class"] and rate["effective_from"] <= day
        ]
        assert any(rate["provider"] in (r["provider_id"], "*") for rate in in_effect), r["record_id"]


def test_vouchers_name_loaded_programs_and_firms() -> None:
    programs = {p["id"] for p in tomllib.loads((EXAMPLES / "programs.toml").read_text())["program"]}
    with (EXAMPLES / "firms.csv").open(newline="") as fh:
        firms = {r["firm_id"] for r in csv.DictReader(fh)}
    with (EXAMPLES / "vouchers.csv").open(newline="") as fh:
        vouchers = list(csv.DictReader(fh))
    assert vouchers
    for v in vouchers:
        assert v["program_id"] in programs and v["firm_id"] in firms, v["voucher_id"]
        assert date.fromisoformat(v["valid_from"]) <= date.fromisoformat(v["valid_until"])


def _example_keys() -> Any:
    from pipeline.keys import parse_registry

    # parsed, not loaded: git keeps the file at 0644, which the loader refuses (as it should)
    return parse_registry(tomllib.loads((EXAMPLES / "keys.toml").read_text()), "keys.toml")


def test_keys_example_loads_and_registers_every_usage_host() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from gpumeter.record import public_key_text

    registry = _example_keys()
    hosts = {(s.host_id, s.provider_id) for s in registry.signers.values()}
    assert {(r["host_id"], r["provider_id"]) for r in usage_rows()} <= hosts
    published = {
        public_key_text(Ed25519PrivateKey.from_private_bytes(bytes([b]) * 32).public_key()) for b in range(256)
    }
    algorithms = set()
    for key_id, key in registry.keys.items():
        algorithms.add(key.algorithm)
        if key.algorithm == "ed25519":
            assert key.material in published, f"{key_id}: a demo key must be one of a published private key"
        else:
            secret = bytes.fromhex(key.material)
            assert len(secret) == 32, f"{key_id}: a demo key must have the 32 bytes the agent needs"
            assert len(set(secret)) == 1, f"{key_id}: a demo key must look fake (one repeated byte)"
    assert algorithms == {"ed25519", "hmac-sha256"}  # the example shows both


def test_agent_example_loads_and_matches_the_keys_example() -> None:
    from agent.config import load_agent_config

    cfg = load_agent_config(EXAMPLES / "agent.toml")
    registry = _example_keys()
    assert cfg.window_s % cfg.interval_s == 0
    assert Path(cfg.key_file).stem == cfg.key_id
    signer = registry.signers[cfg.key_id]
    assert (signer.host_id, signer.provider_id) == (cfg.host_id, cfg.provider_id)
    assert set(cfg.attribution["order"]) <= {"kubernetes", "slurm", "static", "env"}
    own_gpus = {r["gpu_uuid"] for r in usage_rows() if r["host_id"] == cfg.host_id}
    assert set(cfg.attribution["gpu_firms"]) <= own_gpus


def test_config_example_has_only_documented_string_settings() -> None:
    settings = tomllib.loads((EXAMPLES / "config.toml").read_text())
    documented = {"kafka_bootstrap", "topic", "clickhouse_dsn", "clickhouse_database", "billing_db"}
    assert set(settings) == documented
    from gpumeter.settings import ENV_VARS

    text = FORMATS.read_text()
    for key, env in {field: var for var, field in ENV_VARS.items()}.items():  # every setting documented
        assert f"`{key}`" in text and f"`{env}`" in text, key
    assert all(isinstance(value, str) for value in settings.values())
    text = FORMATS.read_text()
    assert all(f"| `{key}` |" in text for key in documented)
