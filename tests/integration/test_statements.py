"""Statements: every figure ties to the invoice; the HTML renders in a real browser."""

from __future__ import annotations

import csv
import io
import re
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest
from billing_helpers import RATES, Cli, row

from billing.adapters.store import Store
from billing.app.statements import check_statement, firm_statement

pytestmark = pytest.mark.integration

PROGRAMS = """[[program]]
id = "CITY-2026"
year = 2026
category = "compute"
budget = "100000.00"
firm_cap = "25.00"

[program.auto_grant]
face_value = "1000.00"
subsidy_rate = "0.5"
"""


@pytest.fixture
def settled(cli: Cli) -> Cli:
    cli.ok(
        "billing",
        "load",
        "--ratecard",
        cli.file("r.toml", RATES),
        "--programs",
        cli.file("p.toml", PROGRAMS),
        "--firms",
        cli.file("f.csv", "firm_id,name,payment_terms_days\nF1,Alpha AI,30\nF2,Beta Robotics,45\n"),
    )
    rows = [row(f"a{d}", f"2026-03-{d:02d}T00:00:00", 3600 * (d % 5 + 1)) for d in range(1, 29)]
    rows += [row(f"b{d}", f"2026-03-{d:02d}T00:00:00", 1800 * d, firm="F2", cls="H100", provider="P2") for d in (3, 9)]
    cli.ok("usage", "import", cli.usage(*rows))
    cli.ok("billing", "settle", "--month", "2026-03")
    cli.ok(
        "usage", "import", cli.usage(row("late", "2026-03-30T00:00:00", 7200), row("apr", "2026-04-02T00:00:00", 60))
    )
    cli.ok("billing", "settle", "--month", "2026-04")
    cli.ok("billing", "pay", "--firm", "F1", "--amount", "50.00", "--date", "2026-04-10", "--reference", "B-1")
    return cli


@pytest.mark.parametrize("month", ["2026-03", "2026-04"])
def test_every_statement_of_a_settled_month_equals_its_invoice(settled: Cli, month: str) -> None:
    out = settled.tmp / "st"
    written = settled.ok("statement", "--month", month, "--format", "csv", "--out", str(out)).out.split()
    invoices = {i["firm_id"]: i for i in settled.ok("billing", "export", "--month", month).json()["invoices"]}
    assert sorted(Path(p).name for p in written) == sorted(
        f"statement-{f}-{month}-{kind}.csv" for f in invoices for kind in ("lines", "daily")
    )
    for firm, inv in invoices.items():
        lines = list(csv.DictReader(io.StringIO((out / f"statement-{firm}-{month}-lines.csv").read_text())))
        charges = [r for r in lines if not r["adjustment_for"].startswith("credit")]
        credits = [r for r in lines if r["adjustment_for"].startswith("credit")]
        assert sum(Decimal(r["amount"]) for r in charges) == Decimal(inv["gross"])
        assert -sum(Decimal(r["amount"]) for r in credits) == Decimal(inv["credit_total"])
        assert [r["gpu_hours"] for r in charges] == [ln["gpu_hours"] for ln in inv["lines"]]
        daily = list(csv.DictReader(io.StringIO((out / f"statement-{firm}-{month}-daily.csv").read_text())))
        own_hours = sum(Decimal(ln["gpu_hours"]) for ln in inv["lines"] if ln["adjustment_for"] is None)
        assert sum(Decimal(r["gpu_hours"]) for r in daily) == own_hours
    with Store(f"sqlite:///{settled.tmp / 'home' / 'billing.sqlite3'}").transaction() as tx:
        from datetime import date

        for firm in invoices:
            check_statement(firm_statement(tx, firm, month, date(2026, 5, 1)))


def test_html_statement_shows_the_invoice_totals_and_adjustments(settled: Cli) -> None:
    out = settled.tmp / "html"
    settled.ok("statement", "--firm", "F1", "--month", "2026-04", "--out", str(out), "--as-of", "2026-06-15")
    page = (out / "statement-F1-2026-04.html").read_text()
    inv = settled.ok("billing", "export", "--month", "2026-04").json()["invoices"][0]
    assert f'id="gross">{inv["gross"]} CNY<' in page
    assert f'id="amount_due">{inv["amount_due"]} CNY<' in page
    assert "late usage of 2026-03" in page
    assert 'id="status">overdue<' in page  # due 2026-05-31, not fully paid by 2026-06-15


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Debian package 'chromium' not installed (make test installs it)")
def test_statement_renders_in_headless_chromium(settled: Cli) -> None:
    out = settled.tmp / "browser"
    settled.ok("statement", "--firm", "F1", "--month", "2026-03", "--out", str(out), "--as-of", "2026-04-20")
    page = out / "statement-F1-2026-03.html"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={settled.tmp / 'chromium-profile'}",
    ]
    browser = _chromium()
    assert browser is not None
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    inv = settled.ok("billing", "export", "--month", "2026-03").json()["invoices"][0]
    assert re.search(rf'id="gross">{re.escape(inv["gross"])} CNY<', dom.stdout), dom.stderr[-2000:]
    assert f'id="credit_total">{inv["credit_total"]} CNY<' in dom.stdout
    assert "<svg" in dom.stdout and "<rect" in dom.stdout  # the daily chart was drawn
    shot = settled.tmp / "statement.png"
    subprocess.run(
        [browser, *flags, f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri()],
        capture_output=True,
        timeout=120,
    )
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a real, non-blank page


def test_provider_statement_and_month_summary(settled: Cli) -> None:
    p2 = settled.ok("billing", "provider-statement", "--provider", "P2", "--month", "2026-03", "--format", "csv").out
    delivered, billed, _per_gpu = p2.strip().split("\n\n")
    assert delivered.splitlines() == ["gpu_class,host_id,gpu_hours_delivered,records", "H100,P2-h1,6.000000,2"]
    assert billed.splitlines() == [
        "gpu_class,gpu_hours_billed,amount_billed",
        "H100,6.000000,60.00",
        "TOTAL,6.000000,60.00",
    ]
    summary = settled.ok("billing", "summary", "--month", "2026-03", "--format", "csv").out.strip().split("\n\n")
    doc = settled.ok("billing", "export", "--month", "2026-03").json()
    gross = sum(Decimal(i["gross"]) for i in doc["invoices"])
    credits = sum(Decimal(i["credit_total"]) for i in doc["invoices"])
    assert summary[0].splitlines()[1] == f"2026-03,2,{gross},{credits},{gross - credits},CNY"
    assert summary[1].splitlines()[1].startswith(f"CITY-2026,2026,{credits},100000.00,")
