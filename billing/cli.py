"""``gpumeter billing`` and ``gpumeter statement``: parse the command line, call one application
function (``billing.app``), format its answer. No rule and no SQL lives here."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import click

from billing.adapters.clickhouse_usage import ClickHouseUsage
from billing.adapters.store import Store
from billing.app.load import load_files
from billing.app.payments import aging_report, receivables, record_payment
from billing.app.reconcile import reconcile
from billing.app.reports import export_month, month_summary
from billing.app.reports import provider_statement as provider_month
from billing.app.settle import settle_month
from billing.app.statements import write_statements
from billing.core.ledger import AGING_BUCKETS, Payment
from billing.core.model import BillingError, month_of, parse_month
from billing.core.money import format_money, parse_money
from gpumeter.cli import settings_from
from gpumeter.settings import Settings
from pipeline import clickhouse

FILE = click.Path(exists=False, dir_okay=False, path_type=Path)


def _store(s: Settings) -> Store:
    return Store(s.billing_db_resolved)


def _usage(s: Settings, progress: Callable[[str], None] = lambda _: None) -> ClickHouseUsage:
    client = clickhouse.connect(s.clickhouse_dsn_resolved, s.clickhouse_database)
    clickhouse.ensure_schema(client, s.clickhouse_database)
    return ClickHouseUsage(client, s.clickhouse_database, progress)


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

    \b
    Example:
      gpumeter billing load --ratecard rates.toml --programs programs.toml \\
                            --vouchers vouchers.csv --firms firms.csv
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

    \b
    Example:
      gpumeter billing settle --month 2026-03
    """
    s = settings_from(ctx)
    if month >= month_of(datetime.now(UTC).date()):
        click.echo(f"Warning: {month} has not ended yet; usage after now will be billed as adjustments.", err=True)
    click.echo(f"settling {month}: reading usage from ClickHouse ...", err=True)

    def to_stderr(line: str) -> None:
        click.echo(line, err=True)

    result = settle_month(_store(s), _usage(s, to_stderr), month, progress=to_stderr)
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
    """Write a settled month's invoices to stdout as JSON (docs/file-formats.md).

    \b
    Example:
      gpumeter billing export --month 2026-03 --format json > invoices-2026-03.json
    """
    document = export_month(_store(settings_from(ctx)), month)
    json.dump(document, sys.stdout, indent=2, ensure_ascii=False)
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
    again changes nothing.

    \b
    Example:
      gpumeter billing pay --firm F0001 --amount 1200.00 --date 2026-04-20 --reference BANK-778
    """
    try:
        value = parse_money(amount)
    except BillingError as exc:
        raise click.BadParameter(str(exc), param_hint="--amount") from None
    payment = Payment(firm_id, value, _day(paid_on, "--date"), reference)
    done = record_payment(_store(settings_from(ctx)), payment, datetime.now(UTC))
    click.echo(
        ("already recorded: " if done.already_recorded else "recorded: ") + f"{firm_id} paid {format_money(value)} on "
        f"{payment.paid_on} ({reference})"
    )
    for a in done.allocations:
        click.echo(f"  {format_money(a.amount)} -> {a.invoice_id}")
    if done.credit_balance:
        click.echo(f"  credit balance for the next invoices: {format_money(done.credit_balance)}")


@billing.command("invoices")
@click.option("--month", default=None, help="Only this settled month, YYYY-MM.")
@click.option("--firm", "firm_id", default=None, help="Only this firm.")
@click.option("--as-of", "as_of", default=None, help="Status as of this date (default today).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv"]), default="table", show_default=True)
@click.pass_context
def invoices_cmd(ctx: click.Context, month: str | None, firm_id: str | None, as_of: str | None, fmt: str) -> None:
    """Invoices with what was paid, what is outstanding and their status (open,
    partially_paid, paid, overdue).

    \b
    Example:
      gpumeter billing invoices --month 2026-03
      gpumeter billing invoices --firm F0001 --as-of 2026-05-01 --format csv
    """
    all_invoices, ledger = receivables(_store(settings_from(ctx)), _day(as_of, "--as-of"))
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
    """What each firm owes, by days past due: not yet due, 0-30, 31-60, 61-90, 90+.

    \b
    Example:
      gpumeter billing aging --as-of 2026-06-01
      gpumeter billing aging --format csv > aging.csv
    """
    report = aging_report(_store(settings_from(ctx)), _day(as_of, "--as-of"))
    rows = [
        (firm, *(format_money(buckets.get(b, Decimal(0))) for b in AGING_BUCKETS))
        for firm, buckets in sorted(report.by_firm.items())
    ]
    rows.append(("TOTAL", *(format_money(report.totals.get(b, Decimal(0))) for b in AGING_BUCKETS)))
    _emit(("firm_id", *AGING_BUCKETS), rows, fmt, right={1, 2, 3, 4, 5})


@billing.command("reconcile")
@click.option("--month", required=True, callback=lambda c, p, v: _month(v), help="Month, YYYY-MM.")
@click.pass_context
def reconcile_cmd(ctx: click.Context, month: str) -> None:
    """Usage hours in ClickHouse vs invoiced vs carried to adjustments, each
    program's budget drawn and left, and every money invariant. Exit 1 on any mismatch.

    \b
    Example:
      gpumeter billing reconcile --month 2026-03
    """
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
    due, and each program's budget drawn (all settlements so far) and left.

    \b
    Example:
      gpumeter billing summary --month 2026-03
      gpumeter billing summary --month 2026-03 --format csv
    """
    m = month_summary(_store(settings_from(ctx)), month)
    head = ("month", "firms_invoiced", "gross", "credits", "amount_due", "currency")
    row = (m.month, str(m.firms_invoiced), format_money(m.gross), format_money(m.credits), format_money(m.amount_due),
           m.currency)  # fmt: skip
    _emit(head, [row], fmt, right={1, 2, 3, 4})
    click.echo("")
    prog = [
        (p.program_id, str(p.year), format_money(p.credits_this_month), format_money(p.budget),
         format_money(p.drawn_to_date), format_money(p.left))
        for p in m.programs
    ]  # fmt: skip
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
    dated in the month, including late usage billed on adjustment lines).

    \b
    Example:
      gpumeter billing provider-statement --provider P01 --month 2026-03
    """
    s = settings_from(ctx)
    st = provider_month(_store(s), _usage(s), provider_id, month)

    def h(seconds: int) -> str:
        return f"{Decimal(seconds) / 3600:.6f}"

    rows = [(cls, host, h(sec), str(n)) for cls, host, sec, n in st.delivered]
    _emit(("gpu_class", "host_id", "gpu_hours_delivered", "records"), rows, fmt, right={2, 3})
    click.echo("")
    billed_rows = [(cls, h(sec), format_money(amt)) for cls, sec, amt in st.billed]
    billed_rows.append(("TOTAL", h(st.billed_seconds), format_money(st.billed_amount)))
    _emit(("gpu_class", "gpu_hours_billed", "amount_billed"), billed_rows, fmt, right={1, 2})


@click.command("statement")
@click.option(
    "--firm", "firm_ids", multiple=True, help="Firm id (repeatable). Default: every firm invoiced that month."
)
@click.option("--month", required=True, callback=lambda c, p, v: _month(v), help="Settled month, YYYY-MM.")
@click.option("--format", "fmt", type=click.Choice(["html", "csv"]), default="html", show_default=True)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Folder to write the statements into.",
)
@click.option("--as-of", "as_of", default=None, help="Payment status as of this date (default today).")
@click.pass_context
def statement(
    ctx: click.Context, firm_ids: tuple[str, ...], month: str, fmt: str, out: Path, as_of: str | None
) -> None:
    """Write a firm's monthly usage statement: invoice summary, subsidy by voucher and
    program, amount due and due date, payment status, daily GPU-hours by class, line
    items, late-usage adjustment lines, and the firm's share vs the subsidised share.

    \b
    HTML is one self-contained, printable file; CSV is two files (line items, daily usage).
    Every statement is checked to equal its invoice to the fen before it is written.
    Example:
      gpumeter statement --firm F0001 --month 2026-03 --format html --out statements/
    """
    s = settings_from(ctx)

    def each(firms: list[str]) -> Iterator[str]:
        with click.progressbar(firms, label=f"statements {month}", file=sys.stderr) as bar:
            yield from bar

    files = write_statements(_store(s), month, list(firm_ids), fmt, out, _day(as_of, "--as-of"), each)
    for path in files:
        click.echo(str(path))
