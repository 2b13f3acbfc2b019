"""A firm's monthly statement as plain data, and the rule that it ties out to its invoice.

Every figure comes from the stored invoice, items, credits and payments, so a statement equals
its invoice to the fen by construction; ``check_statement`` proves it before any file is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import Decimal

from billing.core.invoicing import Invoice
from billing.core.ledger import InvoiceStatus
from billing.core.model import BillingError
from billing.core.money import ZERO


@dataclass(frozen=True, slots=True)
class DayUsage:
    """One (day, class) of the invoice's items: the month's own days, and late usage of closed
    months on its original day (``late_for`` the month it belongs to)."""

    day: date
    gpu_class: str
    late_for: str | None
    allocated_seconds: int
    busy_seconds: int
    energy_joules: int


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
    daily: tuple[DayUsage, ...]  # sorted by (late_for or "", day, gpu_class)
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

    def seconds(late: bool) -> tuple[int, int]:
        on_lines = sum(ln.allocated_seconds for ln in inv.lines if (ln.adjustment_for is not None) == late)
        by_day = sum(d.allocated_seconds for d in st.daily if (d.late_for is not None) == late)
        return on_lines, by_day

    problems = [
        (lines == inv.gross, f"lines {lines} != gross {inv.gross}"),
        (credits == inv.credit_total, f"credits {credits} != credit_total {inv.credit_total}"),
        (st.firm_share + st.subsidy_share == inv.gross, "firm share + subsidy share != gross"),
        (seconds(False)[0] == seconds(False)[1], "daily usage != seconds on the month's own lines"),
        (seconds(True)[0] == seconds(True)[1], "daily late usage != seconds on the adjustment lines"),
        (len(st.spans) == len(inv.lines), "a line without its days"),
        (st.status is None or st.paid == st.status.paid, f"payments listed {st.paid} != paid"),
        (st.paid <= inv.amount_due, f"payments {st.paid} exceed the amount due {inv.amount_due}"),
        (
            not st.vouchers or sum((v.paid for v in st.vouchers), ZERO) == inv.credit_total,
            "voucher notes != credit_total",
        ),
    ]
    bad = [text for ok, text in problems if not ok]
    if bad:
        raise BillingError(f"statement {inv.invoice_id} does not tie out: {'; '.join(bad)}")
