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
        "--ratecard",  # H100 costs 10.00, and 12.00 from 15 March: one class at two prices in March
        cli.file(
            "r.toml",
            RATES + '\n[[rate]]\ngpu_class = "H100"\nprovider = "*"\nprice_per_gpu_hour = "12.00"\n'
            "effective_from = 2026-03-15\n",
        ),
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
    """Five CSVs, one meaning each, that tie to the invoice to the fen and to the second: the
    summary's totals, the charge lines (gross), the credits, the payments (paid), and the usage by
    day and class - late usage on its own day - whose seconds add up to the lines'."""
    out = settled.tmp / "st"
    written = settled.ok("statement", "--month", month, "--format", "csv", "--out", str(out), "--as-of",
                         "2026-06-01").out.split()  # fmt: skip
    invoices = {i["firm_id"]: i for i in settled.ok("billing", "export", "--month", month).json()["invoices"]}
    kinds = ("summary", "lines", "credits", "payments", "daily")
    assert sorted(Path(p).name for p in written) == sorted(
        f"statement-{f}-{month}-{kind}.csv" for f in invoices for kind in kinds
    )
    for firm, inv in invoices.items():
        read = {k: list(csv.DictReader(io.StringIO((out / f"statement-{firm}-{month}-{k}.csv").read_text())))
                for k in kinds}  # fmt: skip
        [summary] = read["summary"]
        assert (summary["gross"], summary["credit_total"], summary["amount_due"], summary["due_date"]) == (
            inv["gross"], inv["credit_total"], inv["amount_due"], inv["due_date"]
        )  # fmt: skip
        assert sum(Decimal(r["amount"]) for r in read["lines"]) == Decimal(inv["gross"])
        assert [r["gpu_hours"] for r in read["lines"]] == [ln["gpu_hours"] for ln in inv["lines"]]
        assert sum(Decimal(r["amount"]) for r in read["credits"]) == Decimal(inv["credit_total"])
        assert sum((Decimal(r["amount_applied"]) for r in read["payments"]), Decimal(0)) == Decimal(summary["paid"])
        assert Decimal(summary["paid"]) + Decimal(summary["outstanding"]) == Decimal(inv["amount_due"])
        line_seconds = sum(int(r["allocated_seconds"]) for r in read["lines"])
        assert sum(int(r["allocated_seconds"]) for r in read["daily"]) == line_seconds
        key = ("provider_id", "gpu_class", "unit_price", "adjustment_for")
        for ln in read["lines"]:  # each line's daily rows hold exactly its seconds, and its hours to the 6th place
            days = [d for d in read["daily"] if all(d[k] == ln[k] for k in key)]
            assert sum(int(d["allocated_seconds"]) for d in days) == int(ln["allocated_seconds"])
            assert sum(Decimal(d["gpu_hours"]) for d in days) == Decimal(ln["gpu_hours"])
            assert min(d["day"] for d in days) == ln["first_day"] and max(d["day"] for d in days) == ln["last_day"]
            assert all(d["adjustment_for"] or d["day"].startswith(month) for d in days)
    with Store(f"sqlite:///{settled.tmp / 'home' / 'billing.sqlite3'}").transaction() as tx:
        from datetime import date

        for firm in invoices:
            check_statement(firm_statement(tx, firm, month, date(2026, 6, 1)))


def test_a_class_at_two_prices_shows_each_price_with_its_days(settled: Cli) -> None:
    out = settled.tmp / "two"
    settled.ok("statement", "--firm", "F1", "--month", "2026-03", "--format", "csv", "--out", str(out))
    lines = list(csv.DictReader(io.StringIO((out / "statement-F1-2026-03-lines.csv").read_text())))
    assert [(r["unit_price"], r["first_day"], r["last_day"]) for r in lines] == [
        ("10.00", "2026-03-01", "2026-03-14"), ("12.00", "2026-03-15", "2026-03-28"),
    ]  # fmt: skip
    settled.ok("statement", "--firm", "F1", "--month", "2026-03", "--out", str(out))
    page = (out / "statement-F1-2026-03.html").read_text()
    assert "<td>03-01 to 03-14</td><td class=n>10.00</td>" in page
    assert "<td>03-15 to 03-28</td><td class=n>12.00</td>" in page


def test_payments_and_a_credit_balance_are_on_the_statement(settled: Cli) -> None:
    """F1 pays its April invoice and 100.00 more: the statement lists each payment applied to the
    invoice (date, reference, amount) and shows the credit balance that waits for the next one."""
    inv = next(
        i for i in settled.ok("billing", "export", "--month", "2026-04").json()["invoices"] if i["firm_id"] == "F1"
    )
    mar = next(
        i for i in settled.ok("billing", "export", "--month", "2026-03").json()["invoices"] if i["firm_id"] == "F1"
    )
    owed = Decimal(inv["amount_due"]) + Decimal(mar["amount_due"]) - Decimal("50.00")
    settled.ok("billing", "pay", "--firm", "F1", "--amount", str(owed + 100), "--date", "2026-06-02",
               "--reference", "B-2")  # fmt: skip
    out = settled.tmp / "pay"
    settled.ok("statement", "--firm", "F1", "--month", "2026-04", "--out", str(out), "--as-of", "2026-06-03")
    page = (out / "statement-F1-2026-04.html").read_text()
    assert 'id="credit_balance">100.00 CNY<' in page and 'id="status">paid<' in page
    assert "<td>2026-06-02</td><td>B-2</td>" in page
    settled.ok("statement", "--firm", "F1", "--month", "2026-04", "--out", str(out), "--as-of", "2026-06-03",
               "--format", "csv")  # fmt: skip
    [summary] = csv.DictReader(io.StringIO((out / "statement-F1-2026-04-summary.csv").read_text()))
    assert (summary["credit_balance"], summary["status"], summary["outstanding"]) == ("100.00", "paid", "0.00")
    r = settled("statement", "--firm", "F1", "--month", "2026-04", "--out", str(out), "--as-of", "2026-04-30")
    assert r.code == 1 and "is before invoice INV-2026-04-F1 was issued (2026-05-01)" in r.err


def test_busy_hours_energy_and_every_day_of_the_month_are_on_the_statement(settled: Cli) -> None:
    out = settled.tmp / "busy"
    settled.ok("usage", "import", settled.usage(
        "," .join(row("e", "2026-05-03T00:00:00", 3600, hours=1).split(",")[:9]) + ",1800.5,720000"
    ))  # fmt: skip
    settled.ok("billing", "settle", "--month", "2026-05")
    settled.ok("statement", "--firm", "F1", "--month", "2026-05", "--out", str(out), "--format", "csv")
    [line] = csv.DictReader(io.StringIO((out / "statement-F1-2026-05-lines.csv").read_text()))
    assert (line["busy_gpu_hours"], line["energy_kwh"]) == (
        "0.500278",
        "0.200",
    )  # 1800.5 s counts 1801 (rule 2.5), 720 kJ
    settled.ok("statement", "--firm", "F1", "--month", "2026-05", "--out", str(out))
    page = (out / "statement-F1-2026-05.html").read_text()
    assert "<td class=n>0.500278</td><td class=n>0.200</td>" in page
    days = re.findall(r'<text class="day"[^>]*>(\d+)</text>', page)
    assert days == ["1", "5", "10", "15", "20", "25", "31"]  # the whole of May, though one day had usage
    ticks = [float(t) for t in re.findall(r'<text class="tick"[^>]*>([\d.]+)</text>', page)]
    assert ticks[0] == 0 and ticks[-1] >= 1 and all(round(t / (ticks[1] - ticks[0]), 9).is_integer() for t in ticks)
    assert ">GPU-h</text>" in page


def test_html_statement_shows_the_invoice_totals_and_adjustments(settled: Cli) -> None:
    out = settled.tmp / "html"
    settled.ok("statement", "--firm", "F1", "--month", "2026-04", "--out", str(out), "--as-of", "2026-06-15")
    page = (out / "statement-F1-2026-04.html").read_text()
    inv = settled.ok("billing", "export", "--month", "2026-04").json()["invoices"][0]
    assert f'id="gross">{inv["gross"]} CNY<' in page
    assert f'id="amount_due">{inv["amount_due"]} CNY<' in page
    assert "late usage of 2026-03" in page
    assert 'id="status">overdue<' in page  # due 2026-05-31, not fully paid by 2026-06-15
    assert 'id="late_usage">Also billed: late usage of earlier months, 2.000000 GPU-h of 2026-03' in page


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Debian package 'chromium' not installed (make test installs it)")
def test_statement_renders_in_headless_chromium(settled: Cli) -> None:
    out = settled.tmp / "browser"
    # F1 pays the rest of March and 30.00 ahead: the page shows both payments and a credit balance
    mar = settled.ok("billing", "export", "--month", "2026-03").json()["invoices"][0]
    rest = Decimal(mar["amount_due"]) - Decimal("50.00") + Decimal("30.00")
    settled.ok("billing", "pay", "--firm", "F1", "--amount", str(rest), "--date", "2026-04-15", "--reference", "B-3")
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
    bars = re.findall(r'<g class="bar" data-day="(2026-03-\d\d)">', dom.stdout)
    assert bars == [f"2026-03-{d:02d}" for d in range(1, 32)]  # every day of March, with usage or not
    assert '<td>2026-04-10</td><td>B-1</td><td class="n">50.00</td>' in dom.stdout.replace("class=n", 'class="n"')
    assert "<td>2026-04-15</td><td>B-3</td>" in dom.stdout
    assert 'id="credit_balance">30.00 CNY<' in dom.stdout and 'id="status">paid<' in dom.stdout
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


def test_the_statement_says_why_a_voucher_paid_less_than_its_rate(settled: Cli) -> None:
    """CITY-2026 pays 50 % but at most 25.00 per firm: F1's March usage is far above that, so its
    statement says the firm cap held the subsidy back; the credits still tie to the invoice."""
    out = settled.tmp / "why"
    settled.ok("statement", "--firm", "F1", "--month", "2026-03", "--out", str(out), "--format", "csv")
    [credit] = csv.DictReader(io.StringIO((out / "statement-F1-2026-03-credits.csv").read_text()))
    inv = settled.ok("billing", "export", "--month", "2026-03").json()["invoices"][0]
    assert (credit["voucher_id"], credit["subsidy_rate"], credit["amount"]) == (
        "AUTO-CITY-2026-F1", "0.5", inv["credit_total"]
    )  # fmt: skip
    assert credit["limits_reached"] == "firm cap of CITY-2026 reached (25.00 per firm)"
    settled.ok("statement", "--firm", "F1", "--month", "2026-03", "--out", str(out))
    page = (out / "statement-F1-2026-03.html").read_text()
    assert "<td class=n>50%</td><td class=n>25.00</td><td>firm cap of CITY-2026 reached (25.00 per firm)</td>" in page


def test_a_voucher_granted_after_the_month_is_not_on_its_statement(settled: Cli) -> None:
    """A program with an automatic grant loaded after March is granted to F1 by May's settlement,
    valid all 2026: March's statement, written again, does not list it (netting never tried it)."""
    later = PROGRAMS.replace("CITY-2026", "LATE-2026").replace('firm_cap = "25.00"', 'firm_cap = "5.00"')
    settled.ok("billing", "load", "--programs", settled.file("late.toml", later))
    settled.ok("usage", "import", settled.usage(row("may", "2026-05-04T00:00:00", 3600)))
    settled.ok("billing", "settle", "--month", "2026-05")
    assert "AUTO-LATE-2026-F1" in settled.ok("billing", "export", "--month", "2026-05").out
    out = settled.tmp / "later"
    settled.ok("statement", "--firm", "F1", "--month", "2026-03", "--out", str(out), "--format", "csv")
    vouchers = [
        r["voucher_id"] for r in csv.DictReader(io.StringIO((out / "statement-F1-2026-03-credits.csv").read_text()))
    ]
    assert vouchers == ["AUTO-CITY-2026-F1"]
