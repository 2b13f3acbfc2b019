"""`gpumeter fleet load/show` on embedded ClickHouse: versions, idempotence, nothing written on a bad file."""

from __future__ import annotations

from typing import Any

import pytest
from billing_helpers import Cli

from gpumeter.fleet import FLEET_COLUMNS

pytestmark = pytest.mark.integration

HEADER = ",".join(FLEET_COLUMNS)
ROWS = [
    "P01,P01-H01,GPU-a,H100-80G,60,2026-01-01T00:00:00Z,,",
    "P01,P01-H01,GPU-b,H100-80G,60,2026-01-01T00:00:00Z,2026-03-01T00:00:00Z,",
    "P02,P02-H01,GPU-c,Ascend-910B,300,2026-01-01T00:00:00Z,,",
]


def versions(ch: tuple[Any, str]) -> list[tuple[int, int]]:
    client, db = ch
    result = client.query(f"SELECT version, devices FROM {db}.fleet_versions ORDER BY version")
    return [(int(r[0]), int(r[1])) for r in result.result_rows]


def test_load_makes_versions_and_the_same_content_again_changes_nothing(ch: tuple[Any, str], cli: Cli) -> None:
    path = cli.file("fleet.csv", "\n".join([HEADER, *ROWS]) + "\n")
    assert "loaded as version 1: 3 device row(s), 2 host(s), 2 provider(s)" in cli.ok("fleet", "load", path).out
    reordered = cli.file("again.csv", "\n".join([HEADER, *reversed(ROWS)]) + "\n")
    assert "unchanged, the current registry is already version 1" in cli.ok("fleet", "load", reordered).out
    moved = cli.file("moved.csv", "\n".join([HEADER, *ROWS, "P01,P01-H02,GPU-b,H20,60,2026-03-01T00:00:00Z,,"]) + "\n")
    assert "loaded as version 2: 4 device row(s)" in cli.ok("fleet", "load", moved).out
    assert versions(ch) == [(1, 3), (2, 4)]
    assert table(cli.ok("fleet", "show", "--at", "2026-02-01").out) == [
        ["P01", "H100-80G", "2", "1"], ["P02", "Ascend-910B", "1", "1"], ["total", "3", "2"],
    ]  # fmt: skip
    assert table(cli.ok("fleet", "show", "--at", "2026-03-01").out) == [  # GPU-b moved to P01-H02 as H20
        ["P01", "H100-80G", "1", "2"], ["P01", "H20", "1", "2"], ["P02", "Ascend-910B", "1", "1"], ["total", "3", "3"],
    ]  # fmt: skip


def table(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()[2:]]


def test_a_bad_file_is_refused_whole_and_writes_nothing(ch: tuple[Any, str], cli: Cli) -> None:
    bad = [*ROWS, "P01,P01-H01,GPU-a,H100-80G,60,2026-02-01T00:00:00Z,,"]  # GPU-a twice at once
    path = cli.file("fleet.csv", "\n".join([HEADER, *bad]) + "\n")
    r = cli("fleet", "load", path)
    assert r.code != 0 and f"{path}:5: GPU GPU-a is also registered for this time on line 2" in r.err
    assert "Traceback" not in r.err
    assert versions(ch) == []
    r = cli("fleet", "show")
    assert r.code != 0 and "no fleet registry loaded yet" in r.err
