"""Firms' statements: assembled from the stored invoices, checked, written as files."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from urllib.parse import quote

from billing.adapters import state
from billing.adapters.statement_render import statement_csv, statement_html
from billing.adapters.store import Store, Tx
from billing.core.invoicing import Invoice
from billing.core.ledger import Payment, apply_payments
from billing.core.model import BillingError, Firm, Program, Voucher, first_day_of_next_month
from billing.core.money import ZERO
from billing.core.netting import NettingState
from billing.core.statement import (
    DayUsage,
    FirmStatement,
    PaymentApplied,
    VoucherNote,
    check_statement,
    voucher_limits,
)


@dataclass(frozen=True, slots=True)
class StatementContext:
    """What every statement of one month reads, read once (a month may have thousands of firms)."""

    month: str
    payments: list[Payment]
    programs: dict[str, Program]
    vouchers: dict[str, Voucher]
    granted_by: dict[str, str]
    drawn: NettingState
    firms: dict[str, Firm]

    by_firm: dict[str, list[Voucher]]  # each firm's vouchers, by voucher_id

    @classmethod
    def read(cls, tx: Tx, month: str) -> StatementContext:
        vouchers = state.vouchers(tx)
        by_firm: dict[str, list[Voucher]] = {}
        for v in sorted(vouchers.values(), key=lambda v: v.voucher_id):
            by_firm.setdefault(v.firm_id, []).append(v)
        return cls(month, state.payments(tx), state.programs(tx), vouchers, state.granted_by(tx),
                   state.drawn_state(tx, through_month=month), state.firms(tx), by_firm)  # fmt: skip


def firm_statement(tx: Tx, firm_id: str, month: str, as_of: date, ctx: StatementContext | None = None) -> FirmStatement:
    ctx = ctx or StatementContext.read(tx, month)
    found = state.invoices(tx, month=month, firm_id=firm_id)
    if not found:
        settled = {s.month for s in state.settlements(tx)}
        why = "has no invoice for" if month in settled else "cannot have a statement yet: not settled:"
        raise BillingError(f"firm {firm_id} {why} {month}")
    invoice = found[0]
    if as_of < invoice.issue_date:
        raise BillingError(
            f"--as-of {as_of} is before invoice {invoice.invoice_id} was issued ({invoice.issue_date}): "
            "a statement's payment status is as of a day on or after its issue"
        )
    ledger = apply_payments(state.invoices(tx, firm_id=firm_id), ctx.payments, as_of)
    status = next((s for s in ledger.statuses if s.invoice_id == invoice.invoice_id), None)
    received = {(p.firm_id, p.reference): p.paid_on for p in ctx.payments}
    applied = tuple(
        PaymentApplied(received[(a.firm_id, a.reference)], a.reference, a.amount, a.applied_on)
        for a in ledger.allocations
        if a.invoice_id == invoice.invoice_id
    )
    # a daily row carries its line's price as written: 10 and 10.00 are one price, shown one way
    prices = {(ln.provider_id, ln.gpu_class, ln.unit_price, ln.adjustment_for): ln.unit_price for ln in invoice.lines}
    daily = sorted(
        (
            DayUsage(day, provider, cls, prices.get((provider, cls, price, late), price), late, seconds, busy, joules)
            for day, provider, cls, late, price, seconds, busy, joules in state.items_of(tx, month, firm_id)
        ),
        key=lambda d: (d.late_for or "", d.day, d.provider_id, d.gpu_class),
    )  # fmt: skip
    spans: dict[tuple[str, str, Decimal, str | None], tuple[date, date]] = {}
    for d in daily:
        first, last = spans.get(d.line_key, (d.day, d.day))
        spans[d.line_key] = (min(first, d.day), max(last, d.day))
    name = ctx.firms[firm_id].name if firm_id in ctx.firms else firm_id
    return FirmStatement(
        firm_id, name, month, invoice, status, as_of,
        daily=tuple(daily),
        spans=tuple(spans.get((ln.provider_id, ln.gpu_class, ln.unit_price, ln.adjustment_for), (invoice.issue_date,
                    invoice.issue_date)) for ln in invoice.lines),
        payments=applied,
        credit_balance=ledger.credit_balances.get(firm_id, ZERO),
        vouchers=_voucher_notes(ctx, firm_id, invoice, {d.day for d in daily}),
    )  # fmt: skip


def _voucher_notes(ctx: StatementContext, firm_id: str, invoice: Invoice, days: set[date]) -> tuple[VoucherNote, ...]:
    """Every voucher credited on the invoice, and every other one netting would have tried on one of
    its items (rule 3.9: the firm's, a compute program of the item's year, valid that day) that
    existed at this settlement, with the limits reached by the end of it."""
    paid_by = {c.voucher_id: c for c in invoice.credits}
    first_day = date.fromisoformat(f"{ctx.month}-01")
    month_days = (first_day, first_day_of_next_month(ctx.month) - timedelta(days=1))
    notes = []
    mine = ctx.by_firm.get(firm_id, [])
    for v in [*mine, *(ctx.vouchers[c] for c in sorted(paid_by) if c in ctx.vouchers and ctx.vouchers[c] not in mine)]:
        program = ctx.programs.get(v.program_id)
        tried = (
            v.firm_id == firm_id and program is not None and program.category == "compute"
            and ctx.granted_by.get(v.voucher_id, ctx.month) <= ctx.month
            and any(program.year == d.year and v.valid_from <= d <= v.valid_until for d in days)
        )  # fmt: skip
        if not tried and v.voucher_id not in paid_by:
            continue
        limits: tuple[str, ...] = ()
        if program is not None:
            limits = voucher_limits(
                v.program_id, (v.valid_from, v.valid_until), month_days, v.face_value, program.firm_cap,
                program.budget, ctx.drawn.drawn_by_voucher.get(v.voucher_id, ZERO),
                ctx.drawn.drawn_by_firm_program.get((firm_id, v.program_id), ZERO),
                ctx.drawn.drawn_by_program.get(v.program_id, ZERO),
            )  # fmt: skip
        credit = paid_by.get(v.voucher_id)
        notes.append(VoucherNote(v.voucher_id, v.program_id, v.subsidy_rate, credit.amount if credit else ZERO, limits))
    known = {n.voucher_id for n in notes}
    notes += [VoucherNote(c.voucher_id, c.program_id, Decimal(0), c.amount, ("voucher not in the store",))
              for c in invoice.credits if c.voucher_id not in known]  # fmt: skip
    return tuple(sorted(notes, key=lambda n: n.voucher_id))


def file_safe(firm_id: str) -> str:
    """The id as part of a file name: as it is when it follows the firm-id rule (letters, digits,
    '.', '_', '-'), else percent-encoded, so no id (one stored before the rule) can name a folder."""
    return quote(firm_id, safe="._-")


def write_statements(
    store: Store,
    month: str,
    firms: list[str] | None,
    fmt: str,
    out: Path,
    as_of: date,
    each: Callable[[list[str]], Iterable[str]] = iter,
) -> list[Path]:
    """Write (and check) the statements of ``firms`` (default: every firm invoiced for ``month``) as
    ``html`` or ``csv`` files in ``out``; returns the files written. ``each`` walks the firm ids
    (the CLI passes a progress bar)."""
    written: list[Path] = []
    with store.transaction() as tx:
        settled = [s.month for s in state.settlements(tx)]
        if month not in settled and (not settled or month > settled[0]):
            latest = f"; the latest settled month is {settled[-1]}" if settled else "; no month is settled yet"
            raise BillingError(
                f"{month} is not settled, so it has no invoices to state{latest} "
                f"(settle it with: gpumeter billing settle --month {month})"
            )
        targets = firms if firms else [i.firm_id for i in state.invoices(tx, month=month)]
        if not targets:
            return []  # a settled (or closed) month that invoiced nobody
        out.mkdir(parents=True, exist_ok=True)
        ctx = StatementContext.read(tx, month)
        for firm_id in each(targets):
            st = firm_statement(tx, firm_id, month, as_of, ctx)
            check_statement(st)
            stem = out / f"statement-{file_safe(firm_id)}-{month}"
            if fmt == "html":
                path = Path(f"{stem}.html")  # not with_suffix: a firm id may contain a dot
                path.write_text(statement_html(st), encoding="utf-8")
                written.append(path)
            else:
                for kind, text in statement_csv(st).items():
                    path = Path(f"{stem}-{kind}.csv")
                    path.write_text(text, encoding="utf-8")
                    written.append(path)
    return written
