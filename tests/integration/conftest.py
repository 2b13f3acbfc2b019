from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from billing_helpers import Cli


@pytest.fixture
def cli(tmp_path: Path, ch: tuple[Any, str], clickhouse_dsn: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:  # fmt: skip
    """The gpumeter CLI in this process, with its own GPUMETER_HOME (SQLite) and ClickHouse database."""
    _, database = ch
    monkeypatch.setenv("GPUMETER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GPUMETER_CLICKHOUSE_DSN", clickhouse_dsn)
    monkeypatch.setenv("GPUMETER_CLICKHOUSE_DATABASE", database)
    monkeypatch.delenv("GPUMETER_BILLING_DB", raising=False)
    yield Cli(tmp_path, capsys)
