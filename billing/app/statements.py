"""Firms' statements: assembled from the stored invoices, checked, written as files."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import date
from pathlib import Path

from billing.adapters import state
from billing.adapters.statement_render import statement_csv, statement_html
from billing.adapters.store import Store, Tx
from billing.core.ledger import apply_payments
from billing.core.model import BillingError
from billing.core.statement import FirmStatement, check_statement


def firm_statement(tx: Tx, firm_id: str, month: str, as_of: date) -> FirmStatement:
    found = state.invoices(tx, month=month, firm_id=firm_id)
    if not found:
        settled = {s.month for s in state.settlements(tx)}
        why = "has no invoice for" if month in settled else "cannot have a statement yet: not settled:"
        raise BillingError(f"firm {firm_id} {why} {month}")
    invoice = found[0]
    ledger = apply_payments(state.invoices(tx, firm_id=firm_id), state.payments(tx), as_of)
    status = next((s for s in ledger.statuses if s.invoice_id == invoice.invoice_id), None)
    daily = state.own_seconds_by_day_and_class(tx, month, firm_id)
    firms = state.firms(tx)
    name = firms[firm_id].name if firm_id in firms else firm_id
    return FirmStatement(firm_id, name, month, invoice, status, as_of, daily)


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
        for firm_id in each(targets):
            st = firm_statement(tx, firm_id, month, as_of)
            check_statement(st)
            stem = out / f"statement-{firm_id}-{month}"
            if fmt == "html":
                path = Path(f"{stem}.html")  # not with_suffix: a firm id may contain a dot
                path.write_text(statement_html(st), encoding="utf-8")
                written.append(path)
            else:
                lines, daily = statement_csv(st)
                for suffix, text in (("-lines.csv", lines), ("-daily.csv", daily)):
                    path = Path(f"{stem}{suffix}")
                    path.write_text(text, encoding="utf-8")
                    written.append(path)
    return written
