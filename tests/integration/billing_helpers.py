"""Helpers for driving the gpumeter CLI in-process against real chDB and SQLite."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from billing.core.model import DEFAULT_PAYMENT_TERMS_DAYS, Firm
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

    # Before each `billing settle`, register what the test's usage names: every (host, GPU) in the
    # fleet registry with its window length, every firm in billing. Tests of the usage checks set
    # this False and build the registry and firms they mean.
    register_usage = True

    def __call__(self, *args: str) -> Result:
        if self.register_usage and args[:2] == ("billing", "settle"):
            self.register_what_usage_names()
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

    def register_what_usage_names(self) -> None:
        from billing.adapters import state
        from billing.adapters.store import Store
        from gpumeter.fleet import FLEET_COLUMNS, ID
        from gpumeter.settings import load_settings
        from pipeline import clickhouse

        s = load_settings()
        client = clickhouse.connect(s.clickhouse_dsn_resolved, s.clickhouse_database)
        clickhouse.ensure_schema(client, s.clickhouse_database)
        db = s.clickhouse_database
        devices = client.query(
            f"SELECT DISTINCT provider_id, host_id, gpu_uuid, any(gpu_class), "
            f"any(intDiv(toUnixTimestamp64Milli(window_end) - toUnixTimestamp64Milli(window_start), 1000)) "
            f"FROM {db}.usage_raw GROUP BY provider_id, host_id, gpu_uuid ORDER BY gpu_uuid, host_id"
        ).result_rows
        rows, seen = [], set()
        for provider, host, gpu, cls, length in devices:
            if gpu not in seen and all(ID.fullmatch(str(v)) for v in (provider, host, gpu, cls)):
                # a GPU under a second host stays unregistered there, as does one the registry cannot name
                seen.add(gpu)
                rows.append(f"{provider},{host},{gpu},{cls},{length},2000-01-01T00:00:00Z,,")
        if rows:
            path = self.file(f"fleet-auto-{self.n}.csv", "\n".join([",".join(FLEET_COLUMNS), *rows]) + "\n")
            self.n += 1
            self.capsys.readouterr()
            main(["fleet", "load", path])
        firms = [str(r[0]) for r in client.query(f"SELECT DISTINCT firm_id FROM {db}.usage_raw").result_rows]
        store = Store(s.billing_db_resolved)
        with store.transaction() as tx:
            known = state.firms(tx)
            for firm in firms:
                if firm not in known and firm != "unattributed":
                    state.put_firm(tx, Firm(firm, firm, DEFAULT_PAYMENT_TERMS_DAYS))

    def file(self, name: str, text: str) -> str:
        path = self.tmp / name
        path.write_text(text)
        return str(path)

    def usage(self, *rows: str, name: str | None = None) -> str:
        self.n += 1
        return self.file(name or f"usage{self.n}.csv", "\n".join([USAGE_HEADER, *rows]) + "\n")


def record_of(gpu: str, start: str, firm: str = "F1", host: str = "h1") -> str:
    """The record_id of the window of GPU ``GPU-<gpu>`` on ``host`` held by ``firm`` from ``start`` (UTC)."""
    begin = datetime.fromisoformat(start + "+00:00")
    return record_id(host, f"GPU-{gpu}", firm, int(begin.timestamp()) * 1000)


def row(gpu: str, start: str, seconds: int, firm: str = "F1", cls: str = "H100", provider: str = "P1",
        hours: int = 24) -> str:  # fmt: skip
    """A usage CSV line of GPU ``GPU-<gpu>`` on host h1 (with its true record_id); the window is
    ``hours`` long from ``start`` (UTC). The same (gpu, start, firm) is the same record. A host has
    one provider and one window length: other providers' windows come from host ``<provider>-h1``,
    windows of other lengths from ``h1-<hours>h``."""
    begin = datetime.fromisoformat(start + "+00:00")
    end = begin + timedelta(hours=hours)
    host = ("h1" if provider == "P1" else f"{provider}-h1") + ("" if hours == 24 else f"-{hours}h")
    rid = record_of(gpu, start, firm, host)
    return f"{rid},{begin.isoformat()},{end.isoformat()},{provider},{host},GPU-{gpu},{cls},{firm},{seconds},,"


def amounts(doc: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    return {i["firm_id"]: (i["gross"], i["credit_total"], i["amount_due"]) for i in doc["invoices"]}


def hourly_rollup(client: Any, database: str) -> list[tuple[Any, ...]]:
    """(hour, provider_id, gpu_class, firm_id, allocated_seconds, records) of usage_hourly, read with FINAL."""
    result = client.query(
        f"SELECT hour, provider_id, gpu_class, firm_id, allocated_seconds, records FROM {database}.usage_hourly "
        "FINAL ORDER BY hour, provider_id, gpu_class, firm_id"
    )
    return [tuple(r) for r in result.result_rows]
