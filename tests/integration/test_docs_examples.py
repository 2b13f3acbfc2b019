"""The example files of docs/file-formats.md load and settle through the CLI, with the results that
docs/billing-rules.md works out by hand.

Only ``gpumeter`` commands are used: the example files must work for anyone who types them.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from datetime import date, datetime
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from billing_helpers import Cli

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
SHANGHAI = ZoneInfo("Asia/Shanghai")  # the example rate card's time zone


def money(exact: Fraction) -> Decimal:
    """Round an exact amount half up to the fen (docs/billing-rules.md 1.3)."""
    return (Decimal(exact.numerator) / Decimal(exact.denominator)).quantize(Decimal("0.01"), ROUND_HALF_UP)


def seconds_by_day(firm_id: str) -> dict[date, int]:
    """The firm's allocated seconds per Shanghai day, each record_id once (rules 1.6, 1.7)."""
    by_day: dict[date, int] = defaultdict(int)
    seen: set[str] = set()
    with (EXAMPLES / "usage.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row["firm_id"] == firm_id and row["record_id"] not in seen:
                seen.add(row["record_id"])
                day = datetime.fromisoformat(row["window_start"]).astimezone(SHANGHAI).date()
                by_day[day] += int(row["allocated_seconds"])
    return dict(by_day)


def load_examples(cli: Cli) -> str:
    out = cli.ok(
        "billing", "load",
        "--ratecard", str(EXAMPLES / "rates.toml"),
        "--programs", str(EXAMPLES / "programs.toml"),
        "--vouchers", str(EXAMPLES / "vouchers.csv"),
        "--firms", str(EXAMPLES / "firms.csv"),
    ).out  # fmt: skip
    return out


def test_the_example_month_loads_settles_and_exports_as_documented(cli: Cli) -> None:
    cli.register_usage = False  # the example's own fleet and firms
    assert "loaded as version 1: 11 device row(s)" in cli.ok("fleet", "load", str(EXAMPLES / "fleet.csv")).out
    imported = cli.ok("usage", "import", str(EXAMPLES / "usage.csv")).out
    assert "15 row(s), 14 record_id(s): 14 new, 0 already in the store" in imported  # line 16 repeats line 2

    assert load_examples(cli).splitlines() == [
        "rates: 6 new, 0 changed, 0 unchanged",
        "programs: 3 new, 0 changed, 0 unchanged",
        "vouchers: 4 new, 0 changed, 0 unchanged",
        "firms: 5 new, 0 changed, 0 unchanged",
    ]
    assert "0 new, 0 changed, 6 unchanged" in load_examples(cli)  # loading again changes nothing

    settled = cli.ok("billing", "settle", "--month", "2026-03").out
    # 12 records of March: line 14 is April in Shanghai, line 15 has no firm (rules 1.6, 5.6)
    assert "invoices: 4  items: 8  usage records: 12" in settled
    assert (
        "vouchers granted automatically (3): AUTO-SH-2026-COMPUTE-F0001, AUTO-SH-2026-COMPUTE-F0002, "
        "AUTO-SH-2026-COMPUTE-F0003"
    ) in settled  # F0004 holds SH-0004 of the same program (rule 3.4)
    assert "unattributed usage (not invoiced): 1 records, 0.500000 GPU-hours" in settled

    doc = cli.ok("billing", "export", "--month", "2026-03", "--format", "json").json()
    invoices = {inv["firm_id"]: inv for inv in doc["invoices"]}
    assert list(invoices) == ["F0001", "F0002", "F0003", "F0004"]  # F0005 has no usage: no invoice

    # F0002 by hand. P02 has its own H100-80G rate, 19.80 (rule 2.2).
    f0002 = seconds_by_day("F0002")
    assert f0002 == {date(2026, 3, 2): 7200, date(2026, 3, 5): 3600}
    item_0302 = money(Fraction(f0002[date(2026, 3, 2)], 3600) * Fraction("19.80"))  # 39.60
    item_0305 = money(Fraction(f0002[date(2026, 3, 5)], 3600) * Fraction("19.80"))  # 19.80
    # The pilot pool (budget 100.00) first pays F0001's 2026-03-02 item in full: 2.5 h at 21.50.
    pool_left = Decimal("100.00") - money(Fraction(9000, 3600) * Fraction("21.50"))  # 46.25
    # 2026-03-02: XH-0002 pays 80 %, then the automatic voucher 30 % of what is left (rule 3.10).
    xh_0302 = min(money(Fraction("0.8") * Fraction(item_0302)), Decimal("60.00"), Decimal("80.00"), pool_left)
    pool_left -= xh_0302
    auto_0302 = money(Fraction("0.30") * Fraction(item_0302 - xh_0302))
    # 2026-03-05: 80 % would be 15.84, but the pool has 14.57 left; the pool is then empty.
    xh_0305 = min(
        money(Fraction("0.8") * Fraction(item_0305)), Decimal("60.00") - xh_0302, Decimal("80.00") - xh_0302, pool_left
    )
    assert xh_0305 == pool_left == Decimal("14.57")
    auto_0305 = money(Fraction("0.30") * Fraction(item_0305 - xh_0305))
    gross = item_0302 + item_0305
    credits = xh_0302 + auto_0302 + xh_0305 + auto_0305
    f2 = invoices["F0002"]
    assert (f2["gross"], f2["credit_total"], f2["amount_due"]) == (str(gross), str(credits), str(gross - credits))
    assert f2["amount_due"] == "9.20"
    assert {c["voucher_id"]: c["amount"] for c in f2["credits"]} == {
        "AUTO-SH-2026-COMPUTE-F0002": str(auto_0302 + auto_0305),
        "XH-0002": str(xh_0302 + xh_0305),
    }  # MD-0002 belongs to a model program: never tried (rule 3.2)

    # F0004 by hand: 6600 s of A800-80G at 12.80 on 2026-03-03, then SH-0004 pays half (rules 2.3, 3.10).
    assert seconds_by_day("F0004") == {date(2026, 3, 3): 6600, date(2026, 4, 1): 3600}
    item = money(Fraction(6600, 3600) * Fraction("12.80"))
    assert item == Decimal("23.47")  # 23.4666...
    credit = money(Fraction("0.5") * Fraction(item))
    assert credit == Decimal("11.74")  # 11.735, half up
    f4 = invoices["F0004"]
    assert (f4["gross"], f4["credit_total"], f4["amount_due"]) == ("23.47", "11.74", "11.73")
    assert f4["due_date"] == "2026-05-31"  # 60 days' terms from 2026-04-01 (rule 4.6)

    # F0003's L40S-48G price changed on 2026-03-16: two lines, the lower price first (rule 4.3).
    assert [(ln["unit_price"], ln["gpu_hours"], ln["amount"]) for ln in invoices["F0003"]["lines"]] == [
        ("5.90", "1.000000", "5.90"),
        ("6.40", "2.000000", "12.80"),
    ]

    # The whole export is the example shown in file-formats.md.
    assert doc == json.loads((EXAMPLES / "invoices-2026-03.json").read_text())

    cli.ok("billing", "reconcile", "--month", "2026-03")

    # The 1 April (Shanghai) window waited for April (rule 5.3): 1 h at 12.80, SH-0004 pays half.
    assert "invoices: 1  items: 1  usage records: 1" in cli.ok("billing", "settle", "--month", "2026-04").out
    april = cli.ok("billing", "export", "--month", "2026-04", "--format", "json").json()["invoices"]
    assert [(i["firm_id"], i["gross"], i["credit_total"], i["amount_due"]) for i in april] == [
        ("F0004", "12.80", "6.40", "6.40")
    ]
