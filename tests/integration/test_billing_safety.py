"""Safety rails for billing staff (issue 17): each mistake gets a clear message, a non-zero exit and
nothing written - through the CLI, on real chDB and SQLite."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

import pytest
from billing_helpers import RATES, Cli, row

pytestmark = pytest.mark.integration

PROGRAMS = """[[program]]
id = "CITY-2026"
year = 2026
category = "compute"
budget = "1000.00"
firm_cap = "100.00"
"""
VOUCHERS = "voucher_id,program_id,firm_id,face_value,subsidy_rate,valid_from,valid_until,priority\n"
FIRMS = "firm_id,name,payment_terms_days\n"


def count(cli: Cli, table: str) -> int:
    with sqlite3.connect(cli.tmp / "home" / "billing.sqlite3") as db:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def test_settle_refuses_a_month_that_has_not_ended_and_closes_nothing(cli: Cli) -> None:
    """In an empty store, settling a month still to come used to succeed, fix the time zone to UTC
    and close every earlier month for good."""
    cli.ok("usage", "import", cli.usage(row("a", "2026-03-02T00:00:00", 3600)))
    later = (datetime.now(UTC).replace(day=1) + timedelta(days=200)).replace(day=1)
    month, ends = later.strftime("%Y-%m"), (later + timedelta(days=32)).replace(day=1).date()
    r = cli("billing", "settle", "--month", month)
    assert r.code == 1 and "no rate card is loaded" in r.err and "gpumeter billing load --ratecard" in r.err
    cli.ok("billing", "load", "--ratecard", cli.file("rates.toml", RATES.replace('"UTC"', '"Asia/Shanghai"')))
    r = cli("billing", "settle", "--month", month)
    assert r.code == 1
    assert f"cannot settle {month}: it has not ended yet (it ends at {ends}T00:00:00+08:00, Asia/Shanghai)" in r.err
    this_month = datetime.now(UTC).strftime("%Y-%m")
    r = cli("billing", "settle", "--month", this_month)  # still running here, whatever the hour in UTC
    assert (r.code == 1 and f"cannot settle {this_month}: it has not ended yet" in r.err) or "2026-03 first" in r.err
    assert count(cli, "settlements") == 0 and count(cli, "invoices") == 0
    assert "Traceback" not in r.err
    # nothing was closed: the month of the usage still settles and bills it
    assert "invoices: 1" in cli.ok("billing", "settle", "--month", "2026-03").out


@pytest.mark.parametrize(
    ("option", "name", "text", "message"),
    [
        ("--ratecard", "rates.toml", 'currency = "CNY"\ntimezone = "Asia/Shanghai"\n', ":1: no [[rate]] tables"),
        ("--programs", "programs.toml", "", ":1: no [[program]] tables"),
        ("--vouchers", "vouchers.csv", VOUCHERS, ":1: no rows"),
        ("--firms", "firms.csv", FIRMS + "\n\n", ":1: no rows"),
    ],
    ids=["ratecard", "programs", "vouchers", "firms"],
)
def test_an_empty_file_is_refused(cli: Cli, option: str, name: str, text: str, message: str) -> None:
    path = cli.file(name, text)
    r = cli("billing", "load", option, path)
    assert r.code == 1 and f"{path}{message}" in r.err
    with sqlite3.connect(cli.tmp / "home" / "billing.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM meta WHERE key = 'timezone'").fetchone() == (0,)  # no zone fixed


def test_every_problem_of_every_file_is_reported_in_one_pass(cli: Cli) -> None:
    """A bad row, an id defined twice, a voucher whose program, firm or year is wrong, an unknown
    top-level key, in two files: all of them at once, nothing written."""
    rates = cli.file("rates.toml", "colour = 1\n" + RATES + '\n[[rate]]\ngpu_class = "A100"\n')
    programs = cli.file("programs.toml", PROGRAMS)
    firms = cli.file("firms.csv", FIRMS + "F1,One,30\n")
    vouchers = cli.file(
        "vouchers.csv",
        VOUCHERS
        + "V1,CITY-2026,F1,10.00,1.5,2026-01-01,2026-12-31,1\n"  # 2: rate above 1
        + "V2,NOPE,F1,10.00,0.5,2026-01-01,2026-12-31,1\n"  # 3: no such program
        + "V3,CITY-2026,F9,10.00,0.5,2026-01-01,2026-12-31,1\n"  # 4: no such firm
        + "V4,CITY-2026,F1,10.00,0.5,2026-06-01,2027-05-31,1\n"  # 5: outside the program's year
        + "V5,CITY-2026,F1,10.00,0.5,2026-01-01,2026-12-31,1\n"  # 6
        + "V5,CITY-2026,F1,20.00,0.5,2026-01-01,2026-12-31,1\n",  # 7: V5 again, differently
    )
    r = cli("billing", "load", "--ratecard", rates, "--programs", programs, "--firms", firms, "--vouchers", vouchers)
    assert r.code == 1
    for expected in (
        f"{rates}:1: unknown top-level key(s) colour",
        f"{rates}:11: [[rate]]: missing key(s) effective_from, price_per_gpu_hour, provider",
        f"{vouchers}:2: subsidy_rate '1.5' must satisfy 0 < rate <= 1",
        f"{vouchers}:3: voucher V2: program NOPE is not loaded",
        f"{vouchers}:4: voucher V3: firm F9 is not loaded (load it with --firms)",
        f"{vouchers}:5: voucher V4: valid 2026-06-01 to 2027-05-31, outside its program CITY-2026's year 2026",
        f"{vouchers}:7: voucher_id V5 already defined differently on line 6",
    ):
        assert expected in r.err
    assert count(cli, "vouchers") == 0 and count(cli, "firms") == 0 and count(cli, "programs") == 0
    # the firms and programs loaded with the vouchers count: fixed, the same load goes in whole
    good = VOUCHERS + "V1,CITY-2026,F1,10.00,0.5,2026-01-01,2026-12-31,1\n"
    cli.ok("billing", "load", "--ratecard", cli.file("ok.toml", RATES), "--programs", programs, "--firms", firms,
           "--vouchers", cli.file("ok.csv", good))  # fmt: skip
    assert count(cli, "vouchers") == 1


def test_a_toml_file_that_is_not_utf8_is_a_plain_error(cli: Cli) -> None:
    path = cli.tmp / "rates.toml"
    path.write_bytes(RATES.encode() + b"\n# tarif \xe9t\xe9\n")
    r = cli("billing", "load", "--ratecard", str(path))
    assert r.code == 1 and f"{path}:10: not UTF-8 text" in r.err and "Traceback" not in r.err


def test_one_record_id_with_two_contents_in_one_usage_file_is_refused_naming_both_lines(cli: Cli) -> None:
    first = row("a", "2026-03-02T00:00:00", 3600)
    again = first.replace(",3600,", ",7200,")
    path = cli.usage(first, row("b", "2026-03-02T00:00:00", 60), first, again)
    r = cli("usage", "import", path)
    assert r.code == 1
    assert f"{path}:5: record_id {first.split(',')[0]} is also on line 2 with different content" in r.err
    assert f"{path}:4:" not in r.err  # an exact repeat counts once
    cli.ok("billing", "load", "--ratecard", cli.file("rates.toml", RATES))
    assert "invoices: 0" in cli.ok("billing", "settle", "--month", "2026-03").out  # nothing was imported


def test_a_payment_dated_after_today_is_refused(cli: Cli) -> None:
    cli.ok(
        "billing",
        "load",
        "--ratecard",
        cli.file("rates.toml", RATES),
        "--firms",
        cli.file("f.csv", FIRMS + "F1,One,30\n"),
    )
    ahead = (datetime.now(UTC) + timedelta(days=800)).date().isoformat()
    r = cli("billing", "pay", "--firm", "F1", "--amount", "10.00", "--date", ahead, "--reference", "B1")
    assert r.code == 1 and f"payment date {ahead} is after today" in r.err
    assert count(cli, "payments") == 0
    today = datetime.now(UTC).date().isoformat()
    cli.ok("billing", "pay", "--firm", "F1", "--amount", "10.00", "--date", today, "--reference", "B1")


def test_statements_of_an_unsettled_month_or_an_unknown_provider_fail_plainly(cli: Cli) -> None:
    cli.ok("usage", "import", cli.usage(row("a", "2026-03-02T00:00:00", 3600)))
    cli.ok("billing", "load", "--ratecard", cli.file("rates.toml", RATES))
    out = cli.tmp / "statements"
    r = cli("statement", "--month", "2026-03", "--out", str(out))
    assert r.code == 1 and "2026-03 is not settled" in r.err and not out.exists()
    cli.ok("billing", "settle", "--month", "2026-03")
    r = cli("statement", "--month", "2026-04", "--out", str(out))
    assert r.code == 1 and "the latest settled month is 2026-03" in r.err
    assert len(cli.ok("statement", "--month", "2026-03", "--out", str(out)).out.split()) == 1
    r = cli("billing", "provider-statement", "--provider", "NOPE", "--month", "2026-03")
    assert r.code == 1 and "unknown provider 'NOPE'" in r.err
    assert (
        "gpu_hours_delivered" in cli.ok("billing", "provider-statement", "--provider", "P1", "--month", "2026-03").out
    )


def test_usage_summary_counts_days_in_the_billing_time_zone(cli: Cli) -> None:
    """20:00 UTC on 31 March is 1 April in Shanghai, where the invoice bills it."""
    cli.ok("usage", "import", cli.usage(row("a", "2026-03-31T20:00:00", 3600, hours=1)))
    utc = cli.ok("usage", "summary", "--by", "firm-day-provider-class")
    assert "2026-03-31" in utc.out and "days in UTC (no billing time zone loaded)" in utc.err
    cli.ok("billing", "load", "--ratecard", cli.file("rates.toml", RATES.replace('"UTC"', '"Asia/Shanghai"')))
    local = cli.ok("usage", "summary", "--by", "firm-day-provider-class")
    assert "2026-04-01" in local.out and "2026-03-31" not in local.out
    assert "days in Asia/Shanghai (the billing time zone)" in local.err
    r = cli("usage", "summary", "--timezone", "Mars/Olympus")
    assert r.code != 0 and "not an IANA time zone" in r.err


def test_one_file_given_for_two_options_is_refused(cli: Cli) -> None:
    """``--vouchers firms.csv --firms firms.csv`` used to load the firms and skip the vouchers' refusal."""
    firms = cli.file("firms.csv", FIRMS + "F1,One,30\n")
    r = cli("billing", "load", "--vouchers", firms, "--firms", firms)
    assert r.code == 1 and f"{firms}:0: given as both --vouchers and --firms" in r.err
    assert count(cli, "firms") == 0


def test_a_program_year_change_keeps_its_vouchers_inside_it(cli: Cli) -> None:
    programs, firms = cli.file("p.toml", PROGRAMS), cli.file("f.csv", FIRMS + "F1,One,30\n")
    vouchers = cli.file("v.csv", VOUCHERS + "V1,CITY-2026,F1,10.00,0.5,2026-01-01,2026-12-31,1\n")
    cli.ok("billing", "load", "--programs", programs, "--firms", firms, "--vouchers", vouchers)
    moved = cli.file("p2.toml", PROGRAMS.replace("year = 2026", "year = 2027"))
    r = cli("billing", "load", "--programs", moved)
    assert r.code == 1 and "program CITY-2026: year 2027 would leave its voucher(s) V1 valid outside it" in r.err
    # with the vouchers' new dates in the same load it goes in, and the unchanged files load again
    v2027 = cli.file("v2.csv", VOUCHERS + "V1,CITY-2026,F1,10.00,0.5,2027-01-01,2027-12-31,1\n")
    cli.ok("billing", "load", "--programs", moved, "--vouchers", v2027)
    cli.ok("billing", "load", "--programs", moved, "--vouchers", v2027, "--firms", firms)


def test_a_voucher_stored_under_older_rules_still_loads_unchanged(cli: Cli) -> None:
    """A voucher stored before the firm rule (its firm never loaded): the same row loads again,
    any change to it must meet the rules."""
    from datetime import date
    from decimal import Decimal

    from billing.adapters import state
    from billing.adapters.store import Store
    from billing.core.model import Voucher

    cli.ok("billing", "load", "--programs", cli.file("p.toml", PROGRAMS))
    with Store(f"sqlite:///{cli.tmp / 'home' / 'billing.sqlite3'}").transaction() as tx:
        state.put_voucher(tx, Voucher("V1", "CITY-2026", "F7", Decimal("10.00"), Decimal("0.5"),
                                      date(2026, 1, 1), date(2026, 12, 31), 1))  # fmt: skip
    row_ = "V1,CITY-2026,F7,10.00,0.5,2026-01-01,2026-12-31,1\n"
    cli.ok("billing", "load", "--vouchers", cli.file("v.csv", VOUCHERS + row_))
    r = cli("billing", "load", "--vouchers", cli.file("v2.csv", VOUCHERS + row_.replace("10.00", "20.00")))
    assert r.code == 1 and "firm F7 is not loaded" in r.err


def test_firm_ids_follow_the_agents_rule_and_csv_cells_never_run(cli: Cli) -> None:
    """A firm id like ``=HYPERLINK(...)`` or ``a/b`` is refused (one rule everywhere); a payment
    reference that starts like a formula is written to every CSV as text."""
    bad = cli.file("bad.csv", FIRMS + '"=HYPERLINK(""http://x"")",Evil,30\na/b,Slash,30\nunattributed,U,30\n')
    r = cli("billing", "load", "--firms", bad)
    assert r.code == 1 and all(f"{bad}:{n}: firm_id" in r.err for n in (2, 3, 4))
    cli.ok("usage", "import", cli.usage(row("a", "2026-03-02T00:00:00", 3600)))
    cli.ok(
        "billing",
        "load",
        "--ratecard",
        cli.file("rates.toml", RATES),
        "--firms",
        cli.file("f.csv", FIRMS + "F1,One,30\n"),
    )
    cli.ok("billing", "settle", "--month", "2026-03")
    cli.ok("billing", "pay", "--firm", "F1", "--amount", "5.00", "--date", "2026-04-02", "--reference", "=1+2")
    out = cli.tmp / "st"
    cli.ok("statement", "--month", "2026-03", "--format", "csv", "--out", str(out), "--as-of", "2026-04-03")
    assert "2026-04-02,'=1+2,5.00" in (out / "statement-F1-2026-03-payments.csv").read_text()
