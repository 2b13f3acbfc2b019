"""Helpers for driving the gpumeter CLI in-process against real chDB and SQLite."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gpumeter.cli import main
from gpumeter.record import record_id

USAGE_HEADER = (
    "record_id,window_start,window_end,provider_id,host_id,gpu_uuid,gpu_class,firm_id,"
    "allocated_seconds,busy_seconds,energy_joules"
)

RATES = """currency = "CNY"
timezone = "UTC"

[[rate]]
gpu_class = "H100"
provider = "*"
price_per_gpu_hour = "10.00"
effective_from = 2025-01-01
"""


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


class Cli:
    def __init__(self, tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.tmp = tmp
        self.capsys = capsys
        self.n = 0

    def __call__(self, *args: str) -> Result:
        self.capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = self.capsys.readouterr()
        return Result(code, out, err)

    def ok(self, *args: str) -> Result:
        r = self(*args)
        assert r.code == 0, f"{args} failed: {r.err}"
        return r

    def file(self, name: str, text: str) -> str:
        path = self.tmp / name
        path.write_text(text)
        return str(path)

    def usage(self, *rows: str, name: str | None = None) -> str:
        self.n += 1
        return self.file(name or f"usage{self.n}.csv", "\n".join([USAGE_HEADER, *rows]) + "\n")


def record_of(gpu: str, start: str, firm: str = "F1") -> str:
    """The record_id of the window of GPU ``GPU-<gpu>`` on host h1 held by ``firm`` from ``start`` (UTC)."""
    begin = datetime.fromisoformat(start + "+00:00")
    return record_id("h1", f"GPU-{gpu}", firm, int(begin.timestamp()) * 1000)


def row(gpu: str, start: str, seconds: int, firm: str = "F1", cls: str = "H100", provider: str = "P1",
        hours: int = 24) -> str:  # fmt: skip
    """A usage CSV line of GPU ``GPU-<gpu>`` on host h1 (with its true record_id); the window is
    ``hours`` long from ``start`` (UTC). The same (gpu, start, firm) is the same record."""
    begin = datetime.fromisoformat(start + "+00:00")
    end = begin + timedelta(hours=hours)
    rid = record_of(gpu, start, firm)
    return f"{rid},{begin.isoformat()},{end.isoformat()},{provider},h1,GPU-{gpu},{cls},{firm},{seconds},,"


def amounts(doc: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    return {i["firm_id"]: (i["gross"], i["credit_total"], i["amount_due"]) for i in doc["invoices"]}


def hourly_rollup(client: Any, database: str) -> list[tuple[Any, ...]]:
    """(hour, provider_id, gpu_class, firm_id, allocated_seconds, records) of usage_hourly, read with FINAL."""
    result = client.query(
        f"SELECT hour, provider_id, gpu_class, firm_id, allocated_seconds, records FROM {database}.usage_hourly "
        "FINAL ORDER BY hour, provider_id, gpu_class, firm_id"
    )
    return [tuple(r) for r in result.result_rows]
