"""A firm's monthly statement as plain data, and the rule that it ties out to its invoice.

Every figure comes from the stored invoice, items and credits, so a statement equals its
invoice to the fen by construction; ``check_statement`` proves it before any file is written.
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
class FirmStatement:
    firm_id: str
    firm_name: str
    month: str
    invoice: Invoice
    status: InvoiceStatus | None
    as_of: date
    daily_seconds: dict[tuple[date, str], int]  # (day, gpu_class) -> allocated seconds, own items of the month

    @property
    def subsidy_share(self) -> Decimal:
        return self.invoice.credit_total

    @property
    def firm_share(self) -> Decimal:
        return self.invoice.amount_due


def check_statement(st: FirmStatement) -> None:
    """The statement's figures equal its invoice to the fen (and add up); raise if not."""
    inv = st.invoice
    lines = sum((ln.amount for ln in inv.lines), ZERO)
    credits = sum((c.amount for c in inv.credits), ZERO)
    own_seconds = sum(ln.allocated_seconds for ln in inv.lines if ln.adjustment_for is None)
    problems = [
        (lines == inv.gross, f"lines {lines} != gross {inv.gross}"),
        (credits == inv.credit_total, f"credits {credits} != credit_total {inv.credit_total}"),
        (st.firm_share + st.subsidy_share == inv.gross, "firm share + subsidy share != gross"),
        (sum(st.daily_seconds.values()) == own_seconds, "daily usage != hours on the month's own lines"),
    ]
    bad = [text for ok, text in problems if not ok]
    if bad:
        raise BillingError(f"statement {inv.invoice_id} does not tie out: {'; '.join(bad)}")
