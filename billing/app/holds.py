"""Held usage, as billing staff see it (docs/usage-checks.md): list it, release it, exclude it.

A settlement holds the records the usage checks cannot defend. Staff list them by reason, fix
what they failed (the fleet registry, the firms) or decide: **release** (bill it: staff vouch
for the record's GPU, host, window or age) or **exclude** (never bill it), each with who, when
and why. A decision takes effect at the next settlement, which bills a released record as late
usage of its month (docs/billing-rules.md 5.4).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from billing.adapters import state
from billing.adapters.store import Store
from billing.app.ports import HeldRecord, UsageHolds
from billing.core.model import BillingError

# what a release may set aside: staff vouch for the record's host, window or age; its GPU is registered,
# so it bills in the registered class. Not an unregistered GPU (register it: its usage then bills, in the
# class the registry gives it, never the record's), an oversubscribed window (exclude the records that
# should not bill: the rest then bill), an unknown firm (load the firm), nor an exclusion (final)
RELEASABLE = ("other_host", "other_provider", "window_length", "misaligned", "too_old")


class HoldDecisionError(BillingError):
    code = "hold_decision"


@dataclass(slots=True)
class HoldGroup:
    reason: str
    records: int = 0
    allocated_seconds: int = 0
    examples: list[HeldRecord] = field(default_factory=list)
    decided: int = 0  # of them, with a decision the next settlement applies


@dataclass(frozen=True, slots=True)
class HoldList:
    settled_through: str | None  # the last settled month; None before the first settlement
    groups: list[HoldGroup]
    pending: dict[str, tuple[str, str, datetime, str]]  # record_id -> (decision, by, at, why), not yet applied


def _context(store: Store) -> tuple[str, int, str | None, datetime | None]:
    with store.transaction() as tx:
        done = state.settlements(tx)
        return (state.store_id(tx), done[-1].seq if done else 0, done[-1].month if done else None,
                done[-1].usage_cutoff if done else None)  # fmt: skip


def list_holds(store: Store, holds: UsageHolds, reasons: Sequence[str] = (), examples: int = 5) -> HoldList:
    store_id, seq, month, cutoff = _context(store)
    pending = holds.decisions_after(store_id, cutoff)
    groups: dict[str, HoldGroup] = {}
    for h in holds.open_holds(store_id, seq, reasons):
        g = groups.setdefault(h.reason, HoldGroup(h.reason))
        g.records += 1
        g.allocated_seconds += h.allocated_seconds
        g.decided += h.record_id in pending
        if len(g.examples) < examples:
            g.examples.append(h)
    return HoldList(month, [groups[r] for r in sorted(groups)], pending)


def decide(
    store: Store,
    holds: UsageHolds,
    decision: str,
    why: str,
    by: str,
    at: datetime,
    reasons: Sequence[str] = (),
    record_ids: Sequence[str] = (),
) -> dict[str, int]:
    """Release or exclude held records (all of ``reasons``, or these ``record_ids``); reason -> records
    decided. Refuses, writing nothing, a record that is not held, a release where it cannot help, and
    a decision without a reason."""
    if decision not in ("release", "exclude"):
        raise HoldDecisionError(f"unknown decision {decision!r}")
    if not why.strip():
        raise HoldDecisionError("say why (--why): the decision is recorded with it")
    if not reasons and not record_ids:
        raise HoldDecisionError("name the held records: --reason CODE or --record RECORD_ID")
    store_id, seq, _, _ = _context(store)
    found = holds.open_holds(store_id, seq, reasons, record_ids)
    missing = sorted(set(record_ids) - {h.record_id for h in found})
    if missing:
        raise HoldDecisionError(
            f"not held now: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} "
            "(see gpumeter billing holds); nothing recorded"
        )
    if not found:
        raise HoldDecisionError("no held record matches; nothing recorded")
    if decision == "release":
        refused = sorted({h.reason for h in found} - set(RELEASABLE))
        if refused:
            raise HoldDecisionError(
                f"records held as {', '.join(refused)} cannot be released: for unregistered, register the GPU "
                "(gpumeter fleet load); for oversubscribed, exclude the records of the window that should not "
                "bill (the rest then bill); for unknown_firm, load the firm; excluded is final. Nothing recorded"
            )
    holds.decide(store_id, [h.record_id for h in found], decision, by, why.strip(), at)
    counts: dict[str, int] = defaultdict(int)
    for h in found:
        counts[h.reason] += 1
    return dict(counts)
