"""``gpumeter billing``: load configuration, settle months, export, record payments, chase what is owed."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import click

from billing import state
from billing.clickhouse_usage import ClickHouseUsage
from billing.invoicing import export_document
from billing.ledger import Payment, aging, apply_payments
from billing.load import load_files
from billing.model import BillingError, month_of, parse_month
from billing.money import format_money, parse_money
from billing.reconcile import reconcile
from billing.settle import settle_month
from billing.store import Store
from gpumeter.cli import settings_from
from gpumeter.settings import Settings
from pipeline import clickhouse

FILE = click.Path(exists=False, dir_okay=False, path_type=Path)
BUCKETS = ("not_due", "0-30", "31-60", "61-90", "90+")


def _store(s: Settings) -> Store:
    return Store(s.billing_db_resolved)


def _usage(s: Settings) -> ClickHouseUsage:
    client = clickhouse.connect(s.clickhouse_dsn_resolved, s.clickhouse_database)
    clickhouse.ensure_schema(client, s.clickhouse_database)
    return ClickHouseUsage(client, s.clickhouse_database)


def _month(value: str) -> str:
    try:
        parse_month(value)
    except BillingError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def _day(value: str | None, name: str) -> date:
    if value is None:
        return datetime.now(UTC).date()
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date YYYY-MM-DD", param_hint=name) from None


def _table(header: tuple[str, ...], rows: Sequence[tuple[Any, ...]], right: set[int] | None = None) -> str:
    right = right or set()
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r: tuple[Any, ...]) -> str:
        return "  ".join(
            str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)])


@click.group()
def billing() -> None:
    """Rate cards, vouchers, monthly settlement, invoices, payments.

    \b
    A month's close, in order:
      gpumeter usage import USAGE.csv                  (or the pipeline loads it from Kafka)
      gpumeter billing load --ratecard rates.toml --programs programs.toml \\
                            --vouchers vouchers.csv --firms firms.csv
      gpumeter billing settle --month 2026-03
      gpumeter billing export --month 2026-03 --format json > invoices-2026-03.json
      gpumeter billing reconcile --month 2026-03
      gpumeter billing pay --firm F0001 --amount 1200.00 --date 2026-04-20 --reference BANK-778
      gpumeter billing aging
    """


@billing.command("load")
@click.option("--ratecard", type=FILE, help="Rate card TOML: currency, timezone, [[rate]] tables.")
@click.option("--programs", type=FILE, help="Voucher programs TOML: [[program]] tables.")
@click.option("--vouchers", type=FILE, help="Vouchers CSV.")
@click.option("--firms", type=FILE, help="Firms CSV.")
@click.pass_context
def load(
    ctx: click.Context, ratecard: Path | None, programs: Path | None, vouchers: Path | None, firms: Path | None
) -> None:
    """Load configuration files into the billing store.

    All files are validated whole first; a bad row anywhere refuses everything
    (FILE:LINE: reason) and nothing is written. Loading the same files again
    changes nothing. Rows are upserted by id; leaving a row out deletes nothing.
    """
    if not any((ratecard, programs, vouchers, firms)):
        raise click.UsageError("give at least one of --ratecard, --programs, --vouchers, --firms")
    s = settings_from(ctx)
    report = load_files(_store(s), datetime.now(UTC), ratecard, programs, vouchers, firms)
    for line in report.lines():
        click.echo(line)


@billing.command("settle")
@click.option("--month", required=True, callback=lambda c, p, v: _month(v), help="Month to settle, YYYY-MM.")
@click.pass_context
def settle(ctx: click.Context, month: str) -> None:
    """Settle a month: price usage, net vouchers, issue invoices, close the month.

    Months settle in calendar order. Settling a closed month again changes
    nothing and shows the stored result. Usage that arrives later for a closed
    month is billed with the next settlement, on adjustment lines. Any unpriced
    usage stops the settlement with a list of what lacks a price; nothing is written.
    """
    s = settings_from(ctx)
    if month >= month_of(datetime.now(UTC).date()):
        click.echo(f"Warning: {month} has not ended yet; usage after now will be billed as adjustments.", err=True)
    click.echo(f"settling {month}: reading usage from ClickHouse ...", err=True)
    usage = _usage(s)
    usage.progress = lambda line: click.echo(line, err=True)
    result = settle_month(_store(s), usage, month, progress=lambda line: click.echo(line, err=True))
    row = result.settlement
    if row is None:
        click.echo(f"{month} is closed: it is before the first settled month and has no invoices.")
        return
    gross = sum((i.gross for i in result.invoices), Decimal(0))
    credits = sum((i.credit_total for i in result.invoices), Decimal(0))
    due = sum((i.amount_due for i in result.invoices), Decimal(0))
    if result.already_settled:
        click.echo(f"{month} was already settled at {row.settled_at.isoformat()}; nothing changed.")
    else:
        click.echo(f"settled {month}")
    click.echo(
        f"  invoices: {len(result.invoices)}  items: {row.items}  usage records: {row.records}\n"
        f"  gross: {format_money(gross)} {row.currency}  credits: {format_money(credits)}  "
        f"amount due: {format_money(due)}"
    )
    adjustments = sum(1 for i in result.invoices for ln in i.lines if ln.adjustment_for)
    if adjustments:
        click.echo(f"  adjustment lines for late usage of closed months: {adjustments}")
    if result.auto_granted:
        shown = ", ".join(result.auto_granted[:10])
        more = f" and {len(result.auto_granted) - 10} more" if len(result.auto_granted) > 10 else ""
        click.echo(f"  vouchers granted automatically ({len(result.auto_granted)}): {shown}{more}")
    if row.unattributed_records:
        click.echo(
            f"  unattributed usage (not invoiced): {row.unattributed_records} records, "
            f"{Decimal(row.unattributed_seconds) / 3600:.6f} GPU-hours"
        )
    if row.conflicting_records:
        examples = ", ".join(result.conflicting_examples[:5])
        click.echo(
            f"  records delivered again with different content (first delivery billed, later ones not): "
            f"{row.conflicting_records}{': ' + examples if examples else ''}"
        )


@billing.command("export")
@click.option("--month", required=True, callback=lambda c, p, v: _month(v), help="Settled month, YYYY-MM.")
@click.option("--format", "fmt", type=click.Choice(["json"]), default="json", show_default=True)
@click.pass_context
def export(ctx: click.Context, month: str, fmt: str) -> None:
    """Write a settled month's invoices to stdout (JSON of billing-rules section 6)."""
    s = settings_from(ctx)
    with _store(s).transaction() as tx:
        settled = sorted(r.month for r in state.settlements(tx))
        if month not in settled and not (settled and month < settled[0]):  # before the first: closed, empty
            raise BillingError(f"{month} is not settled: run 'gpumeter billing settle --month {month}' first")
        invoices = state.invoices(tx, month=month)
    json.dump(export_document(month, invoices), sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


@billing.command("pay")
@click.option("--firm", "firm_id", required=True, help="Paying firm.")
@click.option("--amount", required=True, help="Amount paid, e.g. 1200.00 (at most 2 decimals).")
@click.option("--date", "paid_on", required=True, help="Date received, YYYY-MM-DD.")
@click.option("--reference", required=True, help="Bank or remittance reference; unique per firm.")
@click.pass_context
def pay(ctx: click.Context, firm_id: str, amount: str, paid_on: str, reference: str) -> None:
    """Record a payment: it settles the firm's open invoices oldest first; any
    leftover stays as credit for the next invoices. Recording the same payment
    again changes nothing."""
    s = settings_from(ctx)
    try:
        value = parse_money(amount)
    except BillingError as exc:
        raise click.BadParameter(str(exc), param_hint="--amount") from None
    payment = Payment(firm_id, value, _day(paid_on, "--date"), reference)
    store = _store(s)
    with store.transaction() as tx:
        known = state.firms(tx).keys() | {i.firm_id for i in state.invoices(tx)}
        if firm_id not in known:
            raise BillingError(f"unknown firm {firm_id!r}: load it with 'gpumeter billing load --firms'")
        existing = {(p.firm_id, p.reference): p for p in state.payments(tx)}
        old = existing.get((firm_id, reference))
        if old is not None and old != payment:
            raise BillingError(
                f"reference {reference!r} is already recorded for {firm_id} with amount {old.amount} on "
                f"{old.paid_on}; use a new reference for a new payment"
            )
        if old is None:
            state.put_payment(tx, payment, datetime.now(UTC))
        ledger = apply_payments(
            state.invoices(tx, firm_id=firm_id), state.payments(tx), max(payment.paid_on, datetime.now(UTC).date())
        )
    click.echo(
        ("already recorded: " if old else "recorded: ") + f"{firm_id} paid {format_money(value)} on "
        f"{payment.paid_on} ({reference})"
    )
    for a in ledger.allocations:
        if a.reference == reference and a.firm_id == firm_id:
            click.echo(f"  {format_money(a.amount)} -> {a.invoice_id}")
    balance = ledger.credit_balances.get(firm_id, Decimal(0))
    if balance:
        click.echo(f"  credit balance for the next invoices: {format_money(balance)}")


@billing.command("invoices")
@click.option("--month", default=None, help="Only this settled month, YYYY-MM.")
@click.option("--firm", "firm_id", default=None, help="Only this firm.")
@click.option("--as-of", "as_of", default=None, help="Status as of this date (default today).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv"]), default="table", show_default=True)
@click.pass_context
def invoices_cmd(ctx: click.Context, month: str | None, firm_id: str | None, as_of: str | None, fmt: str) -> None:
    """Invoices with what was paid, what is outstanding and their status (open,
    partially_paid, paid, overdue)."""
    s = settings_from(ctx)
    day = _day(as_of, "--as-of")
    with _store(s).transaction() as tx:
        all_invoices = state.invoices(tx)
        ledger = apply_payments(all_invoices, state.payments(tx), day)
    by_id = {i.invoice_id: i for i in all_invoices}
    rows = [
        (
            st.invoice_id,
            st.firm_id,
            by_id[st.invoice_id].month,
            str(st.issue_date),
            str(st.due_date),
            format_money(st.amount_due),
            format_money(st.paid),
            format_money(st.outstanding),
            st.status,
        )
        for st in ledger.statuses
        if (month is None or by_id[st.invoice_id].month == month) and (firm_id is None or st.firm_id == firm_id)
    ]
    header = ("invoice_id", "firm_id", "month", "issue_date", "due_date", "amount_due", "paid", "outstanding", "status")
    _emit(header, rows, fmt, right={5, 6, 7})


@billing.command("aging")
@click.option("--as-of", "as_of", default=None, help="Age as of this date (default today).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv"]), default="table", show_default=True)
@click.pass_context
def aging_cmd(ctx: click.Context, as_of: str | None, fmt: str) -> None:
    """What each firm owes, by days past due: not yet due, 0-30, 31-60, 61-90, 90+."""
    s = settings_from(ctx)
    day = _day(as_of, "--as-of")
    with _store(s).transaction() as tx:
        report = aging(apply_payments(state.invoices(tx), state.payments(tx), day))
    rows = [
        (firm, *(format_money(buckets.get(b, Decimal(0))) for b in BUCKETS))
        for firm, buckets in sorted(report.by_firm.items())
    ]
    rows.append(("TOTAL", *(format_money(report.totals.get(b, Decimal(0))) for b in BUCKETS)))
    _emit(("firm_id", *BUCKETS), rows, fmt, right={1, 2, 3, 4, 5})


@billing.command("reconcile")
@click.option("--month", required=True, callback=lambda c, p, v: _month(v), help="Month, YYYY-MM.")
@click.pass_context
def reconcile_cmd(ctx: click.Context, month: str) -> None:
    """Usage hours in ClickHouse vs invoiced vs carried to adjustments, each
    program's budget drawn and left, and every money invariant. Exit 1 on any mismatch."""
    s = settings_from(ctx)
    result = reconcile(_store(s), _usage(s), month)

    def h(seconds: int) -> str:
        return f"{Decimal(seconds) / 3600:.6f}"

    click.echo(f"usage of {month} (GPU-hours){'' if result.settled else ' - month not settled yet'}:")
    rows = [(f, h(u), h(o), h(a), h(p), h(x)) for f, u, o, a, p, x in result.rows]
    click.echo(
        _table(
            ("firm_id", "in_clickhouse", "invoiced", "adjusted_later", "pending", "unbilled"),
            rows,
            right={1, 2, 3, 4, 5},
        )
    )
    click.echo("\nprograms:")
    prog_rows = [
        (p, str(y), format_money(b), format_money(d), format_money(left)) for p, y, b, d, left in result.programs
    ]
    click.echo(_table(("program_id", "year", "budget", "drawn", "left"), prog_rows, right={2, 3, 4}))
    if result.problems:
        for p in result.problems:
            click.echo(f"MISMATCH {p}", err=True)
        raise BillingError(f"reconciliation of {month} failed: {len(result.problems)} mismatch(es)")
    click.echo(f"\nreconciled {month}: OK (usage = invoiced + adjusted later; all money invariants hold)")


def _emit(header: tuple[str, ...], rows: list[tuple[Any, ...]], fmt: str, right: set[int]) -> None:
    if fmt == "csv":
        import csv

        w = csv.writer(sys.stdout)
        w.writerow(header)
        w.writerows(rows)
    else:
        click.echo(_table(header, rows, right))


@billing.command("summary")
@click.option("--month", required=True, callback=lambda c, p, v: _month(v), help="Settled month, YYYY-MM.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv"]), default="table", show_default=True)
@click.pass_context
def summary_cmd(ctx: click.Context, month: str, fmt: str) -> None:
    """A settled month at a glance: firms invoiced, gross, credits by program, amount
    due, and each program's budget drawn (all settlements so far) and left."""
    s = settings_from(ctx)
    with _store(s).transaction() as tx:
        rows = {r.month: r for r in state.settlements(tx)}
        if month not in rows:
            raise BillingError(f"{month} is not settled")
        invoices = state.invoices(tx, month=month)
        programs = state.programs(tx)
        drawn = state.drawn_state(tx).drawn_by_program
        by_program: dict[str, Decimal] = {}
        for inv in invoices:
            for c in inv.credits:
                by_program[c.program_id] = by_program.get(c.program_id, Decimal(0)) + c.amount
    gross = sum((i.gross for i in invoices), Decimal(0))
    credits = sum((i.credit_total for i in invoices), Decimal(0))
    due = sum((i.amount_due for i in invoices), Decimal(0))
    head = ("month", "firms_invoiced", "gross", "credits", "amount_due", "currency")
    _emit(
        head,
        [
            (
                month,
                str(len(invoices)),
                format_money(gross),
                format_money(credits),
                format_money(due),
                rows[month].currency,
            )
        ],
        fmt,
        right={1, 2, 3, 4},
    )
    click.echo("")
    prog = [
        (
            pid,
            str(p.year),
            format_money(by_program.get(pid, Decimal(0))),
            format_money(p.budget),
            format_money(drawn.get(pid, Decimal(0))),
            format_money(max(p.budget - drawn.get(pid, Decimal(0)), Decimal(0))),
        )
        for pid, p in sorted(programs.items())
    ]
    _emit(
        ("program_id", "year", "credits_this_month", "budget", "drawn_to_date", "left"), prog, fmt, right={2, 3, 4, 5}
    )


@billing.command("provider-statement")
@click.option("--provider", "provider_id", required=True, help="Provider id.")
@click.option("--month", required=True, callback=lambda c, p, v: _month(v), help="Month, YYYY-MM.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv"]), default="table", show_default=True)
@click.pass_context
def provider_statement(ctx: click.Context, provider_id: str, month: str, fmt: str) -> None:
    """What a provider's GPUs delivered in a month: GPU-hours by class and host (from
    ClickHouse, each record once), and the amount billed on that capacity (items
    dated in the month, including late usage billed on adjustment lines)."""
    s = settings_from(ctx)
    with _store(s).transaction() as tx:
        tz = state.get_meta(tx, "timezone", state.DEFAULT_TIMEZONE)
        billed: dict[str, tuple[int, Decimal]] = {}
        for cls, seconds, amount in tx.query(
            "SELECT gpu_class, allocated_seconds, amount FROM items WHERE provider_id = ? AND "
            "((month = ? AND adjustment_for = '') OR adjustment_for = ?)",
            (provider_id, month, month),
        ):
            old = billed.get(cls, (0, Decimal(0)))
            billed[cls] = (old[0] + int(seconds), old[1] + Decimal(amount))
    delivered = _usage(s).hours_by_host(tz, month, provider_id)

    def h(seconds: int) -> str:
        return f"{Decimal(seconds) / 3600:.6f}"

    rows = [(cls, host, h(sec), str(n)) for cls, host, sec, n in delivered]
    _emit(("gpu_class", "host_id", "gpu_hours_delivered", "records"), rows, fmt, right={2, 3})
    click.echo("")
    billed_rows = [(cls, h(sec), format_money(amt)) for cls, (sec, amt) in sorted(billed.items())]
    total = sum((amt for _, amt in billed.values()), Decimal(0))
    billed_rows.append(("TOTAL", h(sum(sec for sec, _ in billed.values())), format_money(total)))
    _emit(("gpu_class", "gpu_hours_billed", "amount_billed"), billed_rows, fmt, right={1, 2})
