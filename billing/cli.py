"""``gpumeter billing`` and ``gpumeter statement``: parse the command line, call one application
function (``billing.app``), format its answer. No rule and no SQL lives here."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import click

from billing.adapters.clickhouse_usage import ClickHouseUsage
from billing.adapters.store import Store
from billing.app.holds import decide, list_holds
from billing.app.load import load_files
from billing.app.payments import aging_report, receivables, record_payment
from billing.app.reconcile import reconcile
from billing.app.reports import export_month, month_summary
from billing.app.reports import provider_statement as provider_month
from billing.app.settle import settle_month
from billing.app.statements import write_statements
from billing.core.ledger import AGING_BUCKETS, Payment
from billing.core.model import BillingError, parse_month
from billing.core.money import format_money, parse_money
from gpumeter import csvsafe
from gpumeter.cli import settings_from
from gpumeter.settings import Settings
from gpumeter.storemeta import peek_meta
from pipeline import clickhouse
from pipeline.usage_checks import HOLD_REASONS, reason_text

FILE = click.Path(exists=False, dir_okay=False, path_type=Path)


def _store(s: Settings) -> Store:
    return Store(s.billing_db_resolved)


def _usage(s: Settings, progress: Callable[[str], None] = lambda _: None) -> ClickHouseUsage:
    client = clickhouse.connect(s.clickhouse_dsn_resolved, s.clickhouse_database, s.clickhouse_ca_file)
    clickhouse.ensure_schema(client, s.clickhouse_database)
    return ClickHouseUsage(client, s.clickhouse_database, progress)


def _month(value: str) -> str:
    try:
        parse_month(value)
    except BillingError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def _day(value: str | None, name: str, s: Settings | None = None) -> date:
    """``value`` as a date; none given: today in the billing time zone (that of issue dates)."""
    if value is None:
        tz = (peek_meta(s.billing_db_resolved, "timezone") if s is not None else None) or "UTC"
        return datetime.now(ZoneInfo(tz)).date()
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

    All files are validated whole first; every problem of every file is reported
    at once (FILE:LINE: reason) and nothing is written. Loading the same files
    again changes nothing. Rows are upserted by id; leaving a row out deletes
    nothing. A file with no rows is refused.

    \b
    Rate card (TOML): currency (default "CNY"), timezone (default "UTC",
      e.g. "Asia/Shanghai"), optional usage_horizon_days (default 92),
      [[rate]] gpu_class, provider ("*" = any), price_per_gpu_hour ("12.50"),
      effective_from (date)
    Programs (TOML): [[program]] id, year, category (compute|model|data),
      budget, firm_cap, optional [program.auto_grant] face_value, subsidy_rate
    Vouchers (CSV): voucher_id, program_id, firm_id, face_value, subsidy_rate,
      valid_from, valid_until, priority   (firm and program loaded, dates in
      the program's year)
    Firms (CSV): firm_id, name, payment_terms_days (empty = 30)
    Full formats: docs/file-formats.md; examples: docs/examples/.

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

    Months settle in calendar order, each once it has ended in the billing time
    zone, and only once a rate card is loaded (it sets that zone): settling
    closes the month and every earlier one for good. Settling a closed month
    again changes nothing and shows the stored result. Usage that arrives later for a closed
    month is billed with the next settlement, on adjustment lines. Any unpriced
    usage stops the settlement with a list of what lacks a price; nothing is written.

    \b
    Example:
      gpumeter billing settle --month 2026-03
    """
    s = settings_from(ctx)
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
    if result.held:
        by_reason: dict[str, list[int]] = {}
        for h in result.held:
            r = by_reason.setdefault(h.reason, [0, 0])
            r[0] += h.records
            r[1] += h.allocated_seconds
        click.echo("  held, not billed (docs/usage-checks.md; see `gpumeter billing holds`):")
        for reason, (records, seconds) in sorted(by_reason.items()):
            hours = f"{Decimal(seconds) / 3600:.6f}"
            click.echo(f"    {reason:<15} {records:>9} records  {hours} GPU-hours  ({reason_text(reason)})")
    if result.released_records:
        click.echo(f"  records held before that bill now, as late usage: {result.released_records}")
    if not result.already_settled and not result.fleet_version:
        click.echo("  no fleet registry is loaded: every GPU is unknown and its usage held (gpumeter fleet load)")
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
    s = settings_from(ctx)
    all_invoices, ledger = receivables(_store(s), _day(as_of, "--as-of", s))
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
    s = settings_from(ctx)
    report = aging_report(_store(s), _day(as_of, "--as-of", s))
    rows = [
        (firm, *(format_money(buckets.get(b, Decimal(0))) for b in AGING_BUCKETS))
        for firm, buckets in sorted(report.by_firm.items())
    ]
    rows.append(("TOTAL", *(format_money(report.totals.get(b, Decimal(0))) for b in AGING_BUCKETS)))
    _emit(("firm_id", *AGING_BUCKETS), rows, fmt, right={1, 2, 3, 4, 5})


def _reasons(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [v for v in values if v not in HOLD_REASONS]
    if unknown:
        raise click.BadParameter(f"unknown reason {', '.join(unknown)}; one of {', '.join(HOLD_REASONS)}")
    return values


@billing.command("holds")
@click.option("--reason", "reasons", multiple=True, callback=_reasons, help="Only this reason (repeatable).")
@click.option(
    "--examples", default=5, show_default=True, type=click.IntRange(0, 1000), help="Records shown per reason."
)
@click.pass_context
def holds_cmd(ctx: click.Context, reasons: tuple[str, ...], examples: int) -> None:
    """Usage the settlements hold, never billed: per reason, records, GPU-hours and examples.

    A settlement holds every record the usage checks cannot defend (docs/usage-checks.md):
    a GPU not in the fleet registry, reported by another host, a window off the host's grid,
    a GPU window claimed beyond its length, usage older than the horizon, a firm not loaded.
    Fix the registry (gpumeter fleet load) or the firms (gpumeter billing load --firms), or
    decide (gpumeter billing release / exclude): the next settlement bills what passes now
    as late usage.

    \b
    Example:
      gpumeter billing holds --reason unregistered --examples 20
    """
    s = settings_from(ctx)
    result = list_holds(_store(s), _usage(s), reasons, examples)
    if not result.groups:
        through = f" through {result.settled_through}" if result.settled_through else ""
        click.echo(f"no usage is held (settlements{through})")
        return
    rows = [(g.reason, str(g.records), f"{Decimal(g.allocated_seconds) / 3600:.6f}", str(g.decided),
             reason_text(g.reason)) for g in result.groups]  # fmt: skip
    click.echo(_table(("reason", "records", "gpu_hours", "decided", "meaning"), rows, right={1, 2, 3}))
    for g in result.groups:
        if not g.examples:
            continue
        click.echo(f"\n{g.reason}: first {len(g.examples)} of {g.records}")
        click.echo(
            _table(
                ("record_id", "window_start", "provider", "host", "gpu", "firm", "seconds", "decision"),
                [(h.record_id, h.window_start.isoformat(), h.provider_id, h.host_id, h.gpu_uuid, h.firm_id,
                  str(h.allocated_seconds), result.pending.get(h.record_id, ("",))[0]) for h in g.examples],
                right={6},
            )
        )  # fmt: skip


def _decide(ctx: click.Context, decision: str, reasons: tuple[str, ...], records: tuple[str, ...], why: str,
            by: str | None) -> None:  # fmt: skip
    s = settings_from(ctx)
    who = by or os.environ.get("USER") or "unknown"
    counts = decide(_store(s), _usage(s), decision, why, who, datetime.now(UTC), reasons, records)
    total = sum(counts.values())
    detail = ", ".join(f"{n} {r}" for r, n in sorted(counts.items()))
    verb = "released (they bill at the next settlement, as late usage)" if decision == "release" else "excluded"
    click.echo(f"{total} held record(s) {verb}: {detail}; recorded as {who}: {why.strip()}")


_DECISION_OPTIONS = [
    click.option("--reason", "reasons", multiple=True, callback=_reasons, help="Every record held for this reason."),
    click.option("--record", "records", multiple=True, help="This held record (repeatable)."),
    click.option("--why", required=True, help="Why: recorded with the decision."),
    click.option("--by", default=None, help="Who decides (default: $USER)."),
]


def _decision_options(f: Any) -> Any:
    for option in reversed(_DECISION_OPTIONS):
        f = option(f)
    return f


@billing.command("release")
@_decision_options
@click.pass_context
def release_cmd(ctx: click.Context, reasons: tuple[str, ...], records: tuple[str, ...], why: str,
                by: str | None) -> None:  # fmt: skip
    """Bill held records after all: the next settlement bills them as late usage.

    For a record whose host, window or age the checks could not defend and staff can
    (reasons other_host, other_provider, window_length, misaligned, too_old). An
    unregistered GPU is settled by registering it (its usage then bills in the registry's
    class), an oversubscribed window by excluding the records that should not bill, an
    unknown firm by loading it. Who, when and why are recorded.

    \b
    Example:
      gpumeter billing release --reason misaligned --why "P07-H03 ran 30 s windows until 4 May, ticket 4411"
    """
    _decide(ctx, "release", reasons, records, why, by)


@billing.command("exclude")
@_decision_options
@click.pass_context
def exclude_cmd(ctx: click.Context, reasons: tuple[str, ...], records: tuple[str, ...], why: str,
                by: str | None) -> None:  # fmt: skip
    """Never bill held records: the next settlement records them as excluded.

    \b
    Example:
      gpumeter billing exclude --record 3f2a9c... --why "duplicate report of GPU-7 by P02-H01"
    """
    _decide(ctx, "exclude", reasons, records, why, by)


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
    rows = [tuple([r[0], *(h(v) for v in r[1:])]) for r in result.rows]
    click.echo(
        _table(
            ("firm_id", "in_clickhouse", "invoiced", "adjusted_later", "held", "excluded", "pending", "unbilled"),
            rows,
            right={1, 2, 3, 4, 5, 6, 7},
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
    click.echo(
        f"\nreconciled {month}: OK (usage = invoiced + adjusted later + held + excluded; all money invariants hold)"
    )


def _emit(header: tuple[str, ...], rows: list[tuple[Any, ...]], fmt: str, right: set[int]) -> None:
    if fmt == "csv":
        w = csvsafe.writer(sys.stdout)
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
    ClickHouse, each record once), the amount billed on that capacity (items
    dated in the month, including late usage billed on adjustment lines), and per
    GPU the hours billed, held (with the reasons, docs/usage-checks.md), excluded
    by staff and still pending. From agents 0.3.0 on, also per GPU where its
    capacity went: sold, unattributed, idle, outage (the driver did not answer)
    and unobserved (the agent was not sampling).

    \b
    Example:
      gpumeter billing provider-statement --provider P01 --month 2026-03
    """
    s = settings_from(ctx)
    usage = _usage(s)
    st = provider_month(_store(s), usage, usage, provider_id, month)

    def h(seconds: int) -> str:
        return f"{Decimal(seconds) / 3600:.6f}"

    rows = [(cls, host, h(sec), str(n)) for cls, host, sec, n in st.delivered]
    _emit(("gpu_class", "host_id", "gpu_hours_delivered", "records"), rows, fmt, right={2, 3})
    click.echo("")
    billed_rows = [(cls, h(sec), format_money(amt)) for cls, sec, amt in st.billed]
    billed_rows.append(("TOTAL", h(st.billed_seconds), format_money(st.billed_amount)))
    _emit(("gpu_class", "gpu_hours_billed", "amount_billed"), billed_rows, fmt, right={1, 2})
    click.echo("")
    gpu_rows = [
        (host, gpu, h(b), h(held), h(excl), h(pend), "; ".join(f"{r} {h(n)}" for r, n in sorted(why.items())))
        for host, gpu, b, held, excl, pend, why in st.gpus
    ]
    _emit(("host_id", "gpu_uuid", "gpu_hours_billed", "held", "excluded", "pending", "held_why"), gpu_rows, fmt,
          right={2, 3, 4, 5})  # fmt: skip
    if st.capacity:  # agents from 0.3.0 on: where every second of each GPU went
        click.echo("")
        cap_rows = [(host, gpu, cls, *(h(x) for x in seconds)) for host, gpu, cls, *seconds in st.capacity]
        _emit(("host_id", "gpu_uuid", "gpu_class", "capacity_hours", "sold", "unattributed", "idle", "outage_unread",
               "unobserved"), cap_rows, fmt, right={3, 4, 5, 6, 7, 8})  # fmt: skip
    elif fmt == "table":
        click.echo("\ncapacity: no GPU windows this month (they come from agents 0.3.0 and later)")


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
    program, amount due and due date, payments applied and credit balance, payment
    status, GPU-hours of every day by class, line items with their days, busy hours
    and energy, late-usage adjustment lines, and the firm's share vs the subsidised share.

    \b
    HTML is one self-contained, printable file; CSV is five files (summary, lines,
    credits, payments, daily usage; docs/file-formats.md). Every statement is checked
    to equal its invoice to the fen before it is written. --as-of is on or after the
    invoice's issue date.
    Example:
      gpumeter statement --firm F0001 --month 2026-03 --format html --out statements/
    """
    s = settings_from(ctx)

    def each(firms: list[str]) -> Iterator[str]:
        with click.progressbar(firms, label=f"statements {month}", file=sys.stderr) as bar:
            yield from bar

    files = write_statements(_store(s), month, list(firm_ids), fmt, out, _day(as_of, "--as-of", s), each)
    for path in files:
        click.echo(str(path))
    if not files:
        click.echo(f"{month} is settled and invoiced nobody: no statement to write", err=True)
