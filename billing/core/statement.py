"""A firm's monthly statement as plain data, and the rule that it ties out to its invoice.

Every figure comes from the stored invoice, items, credits and payments, so a statement equals
its invoice to the fen by construction; ``check_statement`` proves it before any file is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from fractions import Fraction

from billing.core.invoicing import Invoice
from billing.core.ledger import InvoiceStatus
from billing.core.model import BillingError
from billing.core.money import HOURS_DISPLAY_PLACES, ZERO, round_fraction_half_up


@dataclass(frozen=True, slots=True)
class DayUsage:
    """One charge item of the invoice: a day, provider, class and price; the month's own days, and
    late usage of closed months on its original day (``late_for`` the month it belongs to)."""

    day: date
    provider_id: str
    gpu_class: str
    unit_price: Decimal
    late_for: str | None
    allocated_seconds: int
    busy_seconds: int
    energy_joules: int

    @property
    def line_key(self) -> tuple[str, str, Decimal, str | None]:
        """The invoice line it is on (rule 4.3)."""
        return (self.provider_id, self.gpu_class, self.unit_price, self.late_for)


def hours_by_item(st: FirmStatement) -> list[Fraction]:
    """Each daily row's GPU-hours at display precision (``HOURS_DISPLAY_PLACES``), rounded so the
    rows of each invoice line add up exactly to that line's displayed hours (largest remainder)."""
    unit = Fraction(1, 10**HOURS_DISPLAY_PLACES)
    out: list[Fraction] = [Fraction(0)] * len(st.daily)
    rows_of: dict[tuple[str, str, Decimal, str | None], list[int]] = {}
    for i, d in enumerate(st.daily):
        rows_of.setdefault(d.line_key, []).append(i)
    for line in st.invoice.lines:
        rows = rows_of.get((line.provider_id, line.gpu_class, line.unit_price, line.adjustment_for), [])
        exact = [Fraction(st.daily[i].allocated_seconds, 3600) / unit for i in rows]
        floors = [math.floor(x) for x in exact]
        target = Fraction(round_fraction_half_up(line.gpu_hours, HOURS_DISPLAY_PLACES)) / unit
        short = int(target) - sum(floors)
        ahead = set(sorted(range(len(rows)), key=lambda k: (-(exact[k] - floors[k]), k))[: max(short, 0)])
        for k, i in enumerate(rows):
            out[i] = (floors[k] + (1 if k in ahead else 0)) * unit
    return out


@dataclass(frozen=True, slots=True)
class PaymentApplied:
    """``amount`` of payment ``reference`` (received ``paid_on``) applied to this invoice on ``applied_on``."""

    paid_on: date
    reference: str
    amount: Decimal
    applied_on: date


@dataclass(frozen=True, slots=True)
class VoucherNote:
    """A voucher of the firm that could pay this month: what it paid on this invoice, at what rate,
    and the limits that held it back (from the state right after this month's settlement)."""

    voucher_id: str
    program_id: str
    subsidy_rate: Decimal
    paid: Decimal
    limits: tuple[str, ...]  # e.g. "firm cap of CITY-2026 reached (25.00)"; empty: none reached


def voucher_limits(
    program_id: str, valid: tuple[date, date], month_days: tuple[date, date],
    face_value: Decimal, firm_cap: Decimal, budget: Decimal,
    drawn_voucher: Decimal, drawn_firm: Decimal, drawn_program: Decimal,
) -> tuple[str, ...]:  # fmt: skip
    """Why a voucher paid less than its rate of the firm's items (rule 3.10's limits), in words:
    used up, the firm's cap in its program reached, the program's budget exhausted, and its
    validity ending or starting inside the month (items outside it get nothing from it)."""
    out = []
    if drawn_voucher >= face_value:
        out.append(f"voucher used up (face value {face_value:.2f})")
    if drawn_firm >= firm_cap:
        out.append(f"firm cap of {program_id} reached ({firm_cap:.2f} per firm)")
    if drawn_program >= budget:
        out.append(f"budget of {program_id} exhausted ({budget:.2f})")
    if month_days[0] < valid[0] <= month_days[1]:
        out.append(f"valid only from {valid[0]}")
    if month_days[0] <= valid[1] < month_days[1]:
        out.append(f"expired after {valid[1]}")
    return tuple(out)


@dataclass(frozen=True, slots=True)
class FirmStatement:
    firm_id: str
    firm_name: str
    month: str
    invoice: Invoice
    status: InvoiceStatus | None
    as_of: date
    daily: tuple[DayUsage, ...]  # every item, sorted by (late_for or "", day, provider, class)
    spans: tuple[tuple[date, date], ...]  # first and last day of each invoice line's items, in line order
    payments: tuple[PaymentApplied, ...] = ()  # applied to this invoice as of ``as_of``, in order
    credit_balance: Decimal = ZERO  # the firm's money waiting for later invoices, as of ``as_of``
    vouchers: tuple[VoucherNote, ...] = ()  # every voucher that could pay this month, by voucher_id

    @property
    def subsidy_share(self) -> Decimal:
        return self.invoice.credit_total

    @property
    def firm_share(self) -> Decimal:
        return self.invoice.amount_due

    @property
    def paid(self) -> Decimal:
        return sum((p.amount for p in self.payments), ZERO)


def check_statement(st: FirmStatement) -> None:
    """The statement's figures equal its invoice to the fen (and add up); raise if not."""
    inv = st.invoice
    lines = sum((ln.amount for ln in inv.lines), ZERO)
    credits = sum((c.amount for c in inv.credits), ZERO)

    per_line: dict[tuple[str, str, Decimal, str | None], int] = {}
    for d in st.daily:
        per_line[d.line_key] = per_line.get(d.line_key, 0) + d.allocated_seconds
    on_lines = {(ln.provider_id, ln.gpu_class, ln.unit_price, ln.adjustment_for): ln.allocated_seconds
                for ln in inv.lines}  # fmt: skip
    problems = [
        (lines == inv.gross, f"lines {lines} != gross {inv.gross}"),
        (credits == inv.credit_total, f"credits {credits} != credit_total {inv.credit_total}"),
        (st.firm_share + st.subsidy_share == inv.gross, "firm share + subsidy share != gross"),
        (per_line == on_lines, "the daily rows' seconds differ from their lines'"),
        (len(st.spans) == len(inv.lines), "a line without its days"),
        (st.status is None or st.paid == st.status.paid, f"payments listed {st.paid} != paid"),
        (st.paid <= inv.amount_due, f"payments {st.paid} exceed the amount due {inv.amount_due}"),
        (
            sum((v.paid for v in st.vouchers), ZERO) == inv.credit_total,
            "the vouchers listed do not add up to the credits",
        ),
    ]
    bad = [text for ok, text in problems if not ok]
    if bad:
        raise BillingError(f"statement {inv.invoice_id} does not tie out: {'; '.join(bad)}")
