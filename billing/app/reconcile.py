"""``gpumeter billing reconcile``: usage in ClickHouse vs what was invoiced, and every invariant.

For a settled month M (excluding unattributed usage, which is never invoiced):

    usage dated in M and ingested up to the latest settlement's cutoff
      = hours on M's own invoice lines + hours on later adjustment lines for M
        + hours held (docs/usage-checks.md) + hours excluded by staff

and usage that arrived after that cutoff is shown as pending. Then the money
invariants over the whole store: credits on an item <= its amount; no voucher
below zero; no firm over a program's cap; no program over its budget; every
invoice's lines, credits, gross, credit_total and amount_due add up.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal

from billing.adapters import state
from billing.adapters.store import Store, Tx
from billing.app.ports import UsageTotals
from billing.core.model import UNATTRIBUTED


@dataclass(slots=True)
class Reconciliation:
    month: str
    rows: list[tuple[str, int, int, int, int, int, int, int]] = field(default_factory=list)
    # (firm_id, usage_s, own_s, adjusted_later_s, held_s, excluded_s, pending_s, unbilled_s)
    programs: list[tuple[str, int, Decimal, Decimal, Decimal]] = field(default_factory=list)
    # (program_id, year, budget, drawn, left)
    problems: list[str] = field(default_factory=list)
    settled: bool = False


def reconcile(store: Store, usage: UsageTotals, month: str) -> Reconciliation:
    out = Reconciliation(month)
    with store.transaction() as tx:
        done = state.settlements(tx)
        tz = state.get_meta(tx, "timezone", state.DEFAULT_TIMEZONE)
        out.settled = any(s.month == month for s in done)
        latest_cutoff = done[-1].usage_cutoff if done else None
        own, later = state.invoiced_seconds_of_month(tx, month)
        store_id = state.store_id(tx)
        _check_money(tx, out)
    # (every record, those before the last cutoff, of those held, excluded)
    seconds = usage.seconds_by_month(tz, latest_cutoff, store_id, done[-1].seq if done else 0)
    firms = sorted({f for (m, f) in seconds if m == month} | set(own) | set(later))
    for firm in firms:
        if firm == UNATTRIBUTED:
            continue
        total, by_cutoff, held, excluded = seconds.get((month, firm), (0, 0, 0, 0))
        arrived = by_cutoff if out.settled else 0
        billable = arrived - held - excluded
        invoiced = own.get(firm, 0) + later.get(firm, 0)
        unbilled = billable - invoiced
        out.rows.append((firm, total, own.get(firm, 0), later.get(firm, 0), held, excluded, total - arrived, unbilled))
        if out.settled and unbilled != 0:
            out.problems.append(
                f"{firm}: {arrived} s of {month} usage arrived before the last cutoff, {held} s are held and "
                f"{excluded} s excluded, but {invoiced} s were invoiced"
            )
    return out


def _check_money(tx: Tx, out: Reconciliation) -> None:
    programs = state.programs(tx)
    vouchers = state.vouchers(tx)
    drawn = state.drawn_state(tx)
    for pid, program in sorted(programs.items()):
        used = drawn.drawn_by_program.get(pid, Decimal(0))
        out.programs.append((pid, program.year, program.budget, used, program.budget - used))
        if used > program.budget:
            out.problems.append(f"program {pid}: credits {used} exceed the budget {program.budget}")
    for (firm, pid), used in sorted(drawn.drawn_by_firm_program.items()):
        cap = programs[pid].firm_cap if pid in programs else Decimal(0)
        if used > cap:
            out.problems.append(f"firm {firm} drew {used} from program {pid}, over its cap {cap}")
    for vid, used in sorted(drawn.drawn_by_voucher.items()):
        face = vouchers[vid].face_value if vid in vouchers else Decimal(0)
        if used > face:
            out.problems.append(f"voucher {vid}: credits {used} exceed its face value {face}")
    item_amount = state.item_amounts(tx)
    credited = state.credited_per_item(tx)
    for key, amount in credited.items():
        if key not in item_amount or amount > item_amount[key]:
            out.problems.append(f"item {key}: credits {amount} exceed the item amount {item_amount.get(key)}")
    items_by_invoice: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for (m, firm, *_rest), amount in item_amount.items():
        items_by_invoice[(m, firm)] += amount
    credits_by_invoice: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for (m, firm, *_rest), amount in credited.items():
        credits_by_invoice[(m, firm)] += amount
    for inv in state.invoices(tx):
        invoice_key = (inv.month, inv.firm_id)
        lines = sum((ln.amount for ln in inv.lines), Decimal(0))
        creds = sum((c.amount for c in inv.credits), Decimal(0))
        checks = [
            (lines == inv.gross, f"lines add up to {lines}, gross is {inv.gross}"),
            (creds == inv.credit_total, f"credits add up to {creds}, credit_total is {inv.credit_total}"),
            (inv.gross - inv.credit_total == inv.amount_due, "gross - credit_total != amount_due"),
            (
                items_by_invoice[invoice_key] == inv.gross,
                f"items add up to {items_by_invoice[invoice_key]}, gross is {inv.gross}",
            ),
            (credits_by_invoice[invoice_key] == inv.credit_total, "item credits differ from the invoice's credits"),
        ]
        out.problems += [f"invoice {inv.invoice_id}: {text}" for ok, text in checks if not ok]
