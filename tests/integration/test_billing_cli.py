"""Every settlement rule end to end through the CLI: CSV -> real ClickHouse (chDB) -> SQLite -> JSON."""

from __future__ import annotations

import os
import sqlite3
import time
from datetime import UTC, datetime

import pytest
from billing_helpers import RATES, Cli, amounts, record_of, row

pytestmark = pytest.mark.integration

PROGRAM = """[[program]]
id = "CITY-{year}"
year = {year}
category = "compute"
budget = "{budget}"
firm_cap = "{cap}"
"""
VOUCHERS = "voucher_id,program_id,firm_id,face_value,subsidy_rate,valid_from,valid_until,priority\n"


def setup(cli: Cli, programs: str = "", vouchers: str = "", rates: str = RATES) -> None:
    args = ["billing", "load", "--ratecard", cli.file("rates.toml", rates)]
    if programs:
        args += ["--programs", cli.file("programs.toml", programs)]
    if vouchers:
        args += ["--vouchers", cli.file("vouchers.csv", VOUCHERS + vouchers)]
        firms = sorted({line.split(",")[2] for line in vouchers.splitlines() if line.strip()})
        args += [
            "--firms",
            cli.file("firms.csv", "firm_id,name,payment_terms_days\n" + "".join(f"{f},{f},\n" for f in firms)),
        ]
    cli.ok(*args)


def settle_export(cli: Cli, month: str) -> dict:  # type: ignore[type-arg]
    cli.ok("billing", "settle", "--month", month)
    doc: dict = cli.ok("billing", "export", "--month", month, "--format", "json").json()  # type: ignore[type-arg]
    return doc


def test_export_has_exactly_the_specified_shape(cli: Cli) -> None:
    setup(
        cli,
        PROGRAM.format(year=2026, budget="1000.00", cap="1000.00"),
        "V1,CITY-2026,F1,100.00,0.5,2026-01-01,2026-12-31,1\n",
    )
    cli.ok("usage", "import", cli.usage(row("a", "2026-03-02T00:00:00", 5400)))
    doc = settle_export(cli, "2026-03")
    assert doc == {
        "month": "2026-03",
        "invoices": [
            {
                "invoice_id": "INV-2026-03-F1",
                "firm_id": "F1",
                "month": "2026-03",
                "issue_date": "2026-04-01",
                "due_date": "2026-05-01",
                "currency": "CNY",
                "lines": [
                    {
                        "provider_id": "P1",
                        "gpu_class": "H100",
                        "unit_price": "10.00",
                        "gpu_hours": "1.500000",
                        "amount": "15.00",
                        "adjustment_for": None,
                    }
                ],
                "credits": [{"voucher_id": "V1", "program_id": "CITY-2026", "amount": "7.50"}],
                "gross": "15.00",
                "credit_total": "7.50",
                "amount_due": "7.50",
            }
        ],
    }


def test_duplicate_record_ids_are_billed_once(cli: Cli) -> None:
    setup(cli)
    same = row("dup", "2026-03-02T00:00:00", 3600)
    cli.ok("usage", "import", cli.usage(same, same, row("other", "2026-03-03T00:00:00", 3600)))
    r = cli.ok("usage", "import", cli.usage(same))
    assert "0 new, 1 already in the store" in r.out
    doc = settle_export(cli, "2026-03")
    assert amounts(doc) == {"F1": ("20.00", "0.00", "20.00")}


def test_later_delivery_with_different_content_is_reported_never_billed(cli: Cli) -> None:
    setup(cli)
    cli.ok("usage", "import", cli.usage(row("r", "2026-03-02T00:00:00", 3600)))
    cli.ok("usage", "import", cli.usage(row("r", "2026-03-02T00:00:00", 7200)))  # same record, other seconds
    r = cli.ok("billing", "settle", "--month", "2026-03")
    rid = record_of("r", "2026-03-02T00:00:00")
    assert f"different content (first delivery billed, later ones not): 1: {rid}" in r.out
    doc = cli.ok("billing", "export", "--month", "2026-03").json()
    assert amounts(doc) == {"F1": ("10.00", "0.00", "10.00")}


def test_records_resent_after_close_are_not_billed_again_and_late_ones_are_adjustments(cli: Cli) -> None:
    setup(
        cli,
        PROGRAM.format(year=2026, budget="1000.00", cap="1000.00"),
        "V1,CITY-2026,F1,1000.00,0.5,2026-03-01,2026-03-31,1\n",
    )
    march = row("m1", "2026-03-10T00:00:00", 3600)
    cli.ok("usage", "import", cli.usage(march))
    settle_export(cli, "2026-03")
    # the March record comes again (re-sent), plus a genuinely late March record and April usage
    cli.ok(
        "usage",
        "import",
        cli.usage(march, row("m2", "2026-03-31T00:00:00", 7200), row("a1", "2026-04-01T00:00:00", 3600)),
    )
    april = settle_export(cli, "2026-04")
    (inv,) = april["invoices"]
    assert [(ln["gpu_hours"], ln["amount"], ln["adjustment_for"]) for ln in inv["lines"]] == [
        ("1.000000", "10.00", None),
        ("2.000000", "20.00", "2026-03"),
    ]
    # the voucher expired on 03-31 but the late item is judged by its original day: it pays 50% of 20.00
    assert inv["credits"] == [{"voucher_id": "V1", "program_id": "CITY-2026", "amount": "10.00"}]
    assert (inv["gross"], inv["amount_due"]) == ("30.00", "20.00")
    # March's invoice never changes
    assert amounts(cli.ok("billing", "export", "--month", "2026-03").json()) == {"F1": ("10.00", "5.00", "5.00")}
    assert cli.ok("billing", "reconcile", "--month", "2026-03").code == 0


def test_voucher_expiring_mid_month_covers_only_its_days(cli: Cli) -> None:
    setup(
        cli,
        PROGRAM.format(year=2026, budget="1000.00", cap="1000.00"),
        "V1,CITY-2026,F1,1000.00,1,2026-03-01,2026-03-15,1\n",
    )
    cli.ok("usage", "import", cli.usage(row("a", "2026-03-15T00:00:00", 3600), row("b", "2026-03-16T00:00:00", 3600)))
    doc = settle_export(cli, "2026-03")
    assert amounts(doc) == {"F1": ("20.00", "10.00", "10.00")}


def test_pool_exhaustion_drains_in_usage_order_across_firms(cli: Cli) -> None:
    setup(
        cli,
        PROGRAM.format(year=2026, budget="15.00", cap="1000.00"),
        "VA,CITY-2026,FA,100.00,1,2026-01-01,2026-12-31,1\nVB,CITY-2026,FB,100.00,1,2026-01-01,2026-12-31,1\n",
    )
    cli.ok(
        "usage",
        "import",
        cli.usage(
            row("b1", "2026-03-01T00:00:00", 3600, firm="FB"),  # day 1: FB first (only one that day)
            row("a2", "2026-03-02T00:00:00", 3600, firm="FA"),  # day 2: FA before FB by firm_id
            row("b2", "2026-03-02T00:00:00", 3600, firm="FB"),
        ),
    )
    doc = settle_export(cli, "2026-03")
    # FB takes 10.00 on day 1, FA the last 5.00 on day 2, FB's day-2 item finds the pool empty
    assert amounts(doc) == {"FA": ("10.00", "5.00", "5.00"), "FB": ("20.00", "10.00", "10.00")}


def test_firm_cap_binds(cli: Cli) -> None:
    setup(
        cli,
        PROGRAM.format(year=2026, budget="1000.00", cap="12.34"),
        "V1,CITY-2026,F1,100.00,1,2026-01-01,2026-12-31,1\n",
    )
    cli.ok("usage", "import", cli.usage(row("a", "2026-03-01T00:00:00", 3600), row("b", "2026-03-02T00:00:00", 3600)))
    doc = settle_export(cli, "2026-03")
    assert amounts(doc) == {"F1": ("20.00", "12.34", "7.66")}


def test_year_boundary_uses_each_years_program(cli: Cli) -> None:
    programs = PROGRAM.format(year=2025, budget="1000.00", cap="1000.00") + PROGRAM.format(
        year=2026, budget="1000.00", cap="1000.00"
    )
    # a voucher valid past its program's year could never pay there (rule 3.9): refused at load (6.3)
    with pytest.raises(AssertionError, match="outside its program CITY-2025's year 2025"):
        setup(cli, programs, "V25,CITY-2025,F1,1000.00,0.5,2025-01-01,2026-12-31,1\n")
    setup(
        cli,
        programs,
        "V25,CITY-2025,F1,1000.00,0.5,2025-01-01,2025-12-31,1\nV26,CITY-2026,F1,1000.00,0.25,2026-01-01,2026-12-31,2\n",
    )
    cli.ok("usage", "import", cli.usage(row("d", "2025-12-31T00:00:00", 3600)))
    dec = settle_export(cli, "2025-12")
    assert dec["invoices"][0]["credits"] == [{"voucher_id": "V25", "program_id": "CITY-2025", "amount": "5.00"}]
    cli.ok("usage", "import", cli.usage(row("j", "2026-01-01T00:00:00", 3600)))
    jan = settle_export(cli, "2026-01")
    # V25's program is 2025's: on 2026-01-01 only V26 pays
    assert jan["invoices"][0]["credits"] == [{"voucher_id": "V26", "program_id": "CITY-2026", "amount": "2.50"}]


def test_auto_grant_for_firms_without_a_voucher(cli: Cli) -> None:
    programs = PROGRAM.format(year=2026, budget="1000.00", cap="1000.00") + (
        '[program.auto_grant]\nface_value = "3.00"\nsubsidy_rate = "0.40"\n'
    )
    setup(cli, programs, "V1,CITY-2026,FA,100.00,1,2026-01-01,2026-12-31,1\n")
    cli.ok(
        "usage",
        "import",
        cli.usage(row("a", "2026-03-01T00:00:00", 3600, firm="FA"), row("b", "2026-03-01T00:00:00", 3600, firm="FB")),
    )
    r = cli.ok("billing", "settle", "--month", "2026-03")
    assert "vouchers granted automatically (1): AUTO-CITY-2026-FB" in r.out
    doc = cli.ok("billing", "export", "--month", "2026-03").json()
    assert {i["firm_id"]: i["credits"] for i in doc["invoices"]} == {
        "FA": [{"voucher_id": "V1", "program_id": "CITY-2026", "amount": "10.00"}],
        "FB": [{"voucher_id": "AUTO-CITY-2026-FB", "program_id": "CITY-2026", "amount": "3.00"}],
    }


def test_unpriced_usage_is_refused_with_nothing_written(cli: Cli) -> None:
    setup(cli)
    cli.ok(
        "usage",
        "import",
        cli.usage(
            row("a", "2026-03-01T00:00:00", 3600),
            row("b", "2026-03-02T00:00:00", 3600, cls="B200", provider="P9"),
            row("c", "2026-03-01T00:00:00", 3600, cls="L40S"),
        ),
    )
    r = cli("billing", "settle", "--month", "2026-03")
    assert r.code == 1
    assert r.err.strip().endswith(
        "Error: no price for 2 usage key(s): (provider=P1, gpu_class=L40S, day=2026-03-01), "
        "(provider=P9, gpu_class=B200, day=2026-03-02)"
    )
    assert cli("billing", "export", "--month", "2026-03").code == 1
    home = cli.tmp / "home" / "billing.sqlite3"
    with sqlite3.connect(home) as db:
        assert db.execute("SELECT count(*) FROM settlements").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM items").fetchone() == (0,)


def test_months_settle_in_order_and_settling_again_changes_nothing(cli: Cli) -> None:
    setup(cli)
    cli.ok("usage", "import", cli.usage(row("f", "2026-02-01T00:00:00", 3600), row("m", "2026-03-01T00:00:00", 3600)))
    r = cli("billing", "settle", "--month", "2026-03")
    assert r.code == 1
    assert "earlier month(s) never settled still have unbilled usage: 2026-02; settle 2026-02 first" in r.err
    first = settle_export(cli, "2026-02")
    r = cli("billing", "settle", "--month", "2026-04")
    assert r.code == 1 and "the next one to settle is 2026-03, not 2026-04" in r.err
    again = cli.ok("billing", "settle", "--month", "2026-02")
    assert "already settled" in again.out and "nothing changed" in again.out
    assert cli.ok("billing", "export", "--month", "2026-02").json() == first


@pytest.mark.parametrize(
    ("option", "name", "text", "message"),
    [
        (
            "--vouchers",
            "vouchers.csv",
            VOUCHERS + "V1,CITY-2026,F1,10.00,0.5,2026-01-01,2026-12-31,1\n"
            "V2,CITY-2026,F1,10.00,1.5,2026-01-01,2026-12-31,1\n",
            ":3: subsidy_rate '1.5' must satisfy 0 < rate <= 1",
        ),
        (
            "--vouchers",
            "vouchers.csv",
            VOUCHERS + "V1,NOPE,F1,10.00,0.5,2026-01-01,2026-12-31,1\n",
            ":2: voucher V1: program NOPE is not loaded",
        ),
        (
            "--firms",
            "firms.csv",
            "firm_id,name,payment_terms_days\nF1,One,30\nF2,Two,thirty\n",
            ":3: payment_terms_days must be a whole number, got 'thirty'",
        ),
        (
            "--ratecard",
            "r.toml",
            RATES + '\n[[rate]]\ngpu_class = "A100"\nprovider = "*"\n'
            "price_per_gpu_hour = 9.5\neffective_from = 2025-01-01\n",
            ':10: [[rate]]: price_per_gpu_hour must be a string such as "12.50", got 9.5',
        ),
        (
            "--programs",
            "p.toml",
            PROGRAM.format(year=2026, budget="10.00", cap="1.00") + '\n[[program]]\nid = "X"\n'
            'year = 2026\ncategory = "cars"\nbudget = "1"\nfirm_cap = "1"\n',
            ":8: [[program]]: program X: category must",
        ),
    ],
    ids=["voucher-rate", "voucher-program", "firm-terms", "rate-float", "program-category"],
)
def test_a_bad_row_refuses_the_whole_load(cli: Cli, option: str, name: str, text: str, message: str) -> None:
    setup(cli, PROGRAM.format(year=2026, budget="10.00", cap="1.00"))
    good_firms = cli.file("firms-ok.csv", "firm_id,name,payment_terms_days\nOK,Fine,30\n")
    path = cli.file(name, text)
    r = (
        cli("billing", "load", "--firms", good_firms, option, path)
        if option != "--firms"
        else cli("billing", "load", option, path)
    )
    assert r.code == 1
    assert f"{path} refused, nothing written" in r.err
    assert f"{path}{message}" in r.err
    with sqlite3.connect(cli.tmp / "home" / "billing.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM firms").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM vouchers").fetchone() == (0,)


def test_a_bad_usage_row_refuses_the_whole_file(cli: Cli) -> None:
    no_offset = "bad,2026-03-01T00:00:00,2026-03-01T01:00:00,P1,h,G,H100,F1,60,,"
    path = cli.usage(
        row("ok", "2026-03-01T00:00:00", 3600), no_offset, row("big", "2026-03-01T00:00:00", 99999, hours=1)
    )
    r = cli("usage", "import", path)
    assert r.code == 1
    assert f"{path}:3: window_start '2026-03-01T00:00:00' has no UTC offset" in r.err
    assert f"{path}:4: allocated_seconds > window length" in r.err
    setup(cli)
    r = cli("billing", "settle", "--month", "2026-03")
    assert "invoices: 0" in r.out


def test_payments_settle_oldest_first_and_aging_buckets(cli: Cli) -> None:
    setup(cli)
    cli.file("firms.csv", "firm_id,name,payment_terms_days\nF1,One,10\n")
    cli.ok("billing", "load", "--firms", str(cli.tmp / "firms.csv"))
    cli.ok("usage", "import", cli.usage(row("a", "2026-01-05T00:00:00", 3600), row("b", "2026-02-05T00:00:00", 7200)))
    settle_export(cli, "2026-01")
    settle_export(cli, "2026-02")
    r = cli.ok("billing", "pay", "--firm", "F1", "--amount", "15.00", "--date", "2026-03-05", "--reference", "B1")
    assert "10.00 -> INV-2026-01-F1" in r.out and "5.00 -> INV-2026-02-F1" in r.out
    bad = cli("billing", "pay", "--firm", "F1", "--amount", "16.00", "--date", "2026-03-05", "--reference", "B1")
    assert bad.code == 1 and "reference 'B1' is already recorded for F1" in bad.err
    inv = cli.ok("billing", "invoices", "--as-of", "2026-04-20", "--format", "csv").out.splitlines()
    assert inv[1:] == [
        "INV-2026-01-F1,F1,2026-01,2026-02-01,2026-02-11,10.00,10.00,0.00,paid",
        "INV-2026-02-F1,F1,2026-02,2026-03-01,2026-03-11,20.00,5.00,15.00,overdue",
    ]
    aging = cli.ok("billing", "aging", "--as-of", "2026-04-20", "--format", "csv").out.splitlines()
    assert aging[1] == "F1,0.00,0.00,15.00,0.00,0.00"  # 40 days past due


def test_reconcile_fails_loudly_on_a_tampered_store(cli: Cli) -> None:
    setup(cli)
    cli.ok("usage", "import", cli.usage(row("a", "2026-03-01T00:00:00", 3600)))
    settle_export(cli, "2026-03")
    assert cli("billing", "reconcile", "--month", "2026-03").code == 0
    with sqlite3.connect(cli.tmp / "home" / "billing.sqlite3") as db:
        db.execute("UPDATE items SET allocated_seconds = 1800")
    r = cli("billing", "reconcile", "--month", "2026-03")
    assert r.code == 1
    assert (
        "MISMATCH F1: 3600 s of 2026-03 usage arrived before the last cutoff, 0 s are held and 0 s excluded, "
        "but 1800 s were invoiced"
    ) in r.err


def test_hourly_rollup_ignores_redeliveries(cli: Cli) -> None:
    first = cli.usage(
        row("h1", "2026-03-01T10:00:00", 1800, hours=1), row("h2", "2026-03-01T10:00:00", 600, hours=1, firm="F2")
    )
    cli.ok("usage", "import", first)
    assert "1 hour(s) recomputed" in cli.ok("pipeline", "rollup").out
    cli.ok("usage", "import", cli.usage(row("h1", "2026-03-01T10:00:00", 1800, hours=1)))  # re-delivered
    cli.ok("pipeline", "rollup")
    from pipeline import clickhouse

    client = clickhouse.connect(os.environ["GPUMETER_CLICKHOUSE_DSN"], os.environ["GPUMETER_CLICKHOUSE_DATABASE"])
    rows = client.query(
        f"SELECT firm_id, allocated_seconds, records FROM {os.environ['GPUMETER_CLICKHOUSE_DATABASE']}.usage_hourly "
        "FINAL ORDER BY firm_id"
    ).result_rows
    assert [tuple(r) for r in rows] == [("F1", 1800, 1), ("F2", 600, 1)]


def test_conflicts_include_every_field_and_are_reported_once_in_the_settlement_they_arrived_in(cli: Cli) -> None:
    setup(cli)
    cli.ok("usage", "import", cli.usage(row("r", "2026-02-02T00:00:00", 3600)))
    busy = row("r", "2026-02-02T00:00:00", 3600).removesuffix(",,") + ",5,"  # the same record, busy differs
    cli.ok("usage", "import", cli.usage(busy))
    feb = cli.ok("billing", "settle", "--month", "2026-02")
    rid = record_of("r", "2026-02-02T00:00:00")
    assert f"different content (first delivery billed, later ones not): 1: {rid}" in feb.out
    mar = cli.ok("billing", "settle", "--month", "2026-03")
    assert "different content" not in mar.out


def test_a_month_before_the_first_settlement_is_closed_and_exports_empty(cli: Cli) -> None:
    setup(cli)
    cli.ok("usage", "import", cli.usage(row("m", "2026-03-01T00:00:00", 3600)))
    cli.ok("billing", "settle", "--month", "2026-03")
    assert "closed" in cli.ok("billing", "settle", "--month", "2026-02").out
    assert cli.ok("billing", "export", "--month", "2026-02").json() == {"month": "2026-02", "invoices": []}
    assert cli("billing", "export", "--month", "2026-04").code == 1


def test_malformed_unattributed_usage_is_counted_and_never_stops_a_settlement(cli: Cli) -> None:
    """Unattributed usage is never invoiced, so it is never checked as a firm's item: a provider id
    the rate card reserves ('*') on such a row cannot block every firm's invoice."""
    setup(cli)
    odd = row("u", "2026-03-02T00:00:00", 1800, firm="unattributed", provider="*")
    cli.ok("usage", "import", cli.usage(row("a", "2026-03-02T00:00:00", 3600), odd))
    r = cli.ok("billing", "settle", "--month", "2026-03")
    assert "unattributed usage (not invoiced): 1 records, 0.500000 GPU-hours" in r.out
    assert amounts(cli.ok("billing", "export", "--month", "2026-03").json()) == {"F1": ("10.00", "0.00", "10.00")}


def test_an_import_stores_utc_whatever_the_local_time_zone(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """clickhouse-connect reads a naive datetime as local time: the import must not hand it one."""
    monkeypatch.setenv("TZ", "Asia/Shanghai")
    time.tzset()
    try:
        cli.ok("usage", "import", cli.usage(row("z", "2026-03-31T20:00:00", 600, hours=1)))
        cli.ok("pipeline", "rollup")
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    from pipeline import clickhouse

    db = os.environ["GPUMETER_CLICKHOUSE_DATABASE"]
    client = clickhouse.connect(os.environ["GPUMETER_CLICKHOUSE_DSN"], db)
    stored = client.query(f"SELECT toString(window_start), ingested_at FROM {db}.usage_raw").result_rows
    assert stored[0][0] == "2026-03-31 20:00:00.000"
    ingested = stored[0][1].replace(tzinfo=UTC) if stored[0][1].tzinfo is None else stored[0][1]
    assert abs((ingested - datetime.now(UTC)).total_seconds()) < 600
    refreshed = client.query(f"SELECT max(refreshed_at) FROM {db}.usage_hourly").result_rows[0][0]
    refreshed = refreshed.replace(tzinfo=UTC) if refreshed.tzinfo is None else refreshed
    assert abs((refreshed - datetime.now(UTC)).total_seconds()) < 600


def test_statements_of_firms_whose_ids_have_dots_do_not_overwrite_each_other(cli: Cli) -> None:
    setup(cli)
    cli.ok("usage", "import", cli.usage(row("a", "2026-03-02T00:00:00", 3600, firm="F.1"),
                                        row("b", "2026-03-02T00:00:00", 7200, firm="F.2")))  # fmt: skip
    cli.ok("billing", "settle", "--month", "2026-03")
    out = cli.tmp / "statements"
    files = cli.ok("statement", "--month", "2026-03", "--out", str(out)).out.split()
    assert sorted(p.name for p in out.iterdir()) == ["statement-F.1-2026-03.html", "statement-F.2-2026-03.html"]
    assert len(files) == 2
