"""Skipping the explanation trail never changes the credits."""

from __future__ import annotations

import random
from datetime import date
from decimal import Decimal

from billing.core.model import AutoGrant, Program, Rate, UsageAggregate, Voucher
from billing.core.netting import net_items
from billing.core.pricing import price_items


def test_explain_false_gives_identical_credits_and_no_trail() -> None:
    rng = random.Random(7)
    aggregates = [
        UsageAggregate(f"F{f}", date(2026, 3, d), "P1", "H100", rng.randrange(60, 20_000), 1)
        for f in range(5)
        for d in range(1, 29)
    ]
    items = price_items(aggregates, [Rate("H100", "*", Decimal("17.35"), date(2026, 1, 1))])
    programs = [
        Program(
            "CITY", 2026, "compute", Decimal("900.00"), Decimal("250.00"), AutoGrant(Decimal("300.00"), Decimal("0.3"))
        ),
        Program("DIST", 2026, "compute", Decimal("400.00"), Decimal("400.00")),
    ]
    vouchers = [
        Voucher("V1", "DIST", "F1", Decimal("300.00"), Decimal("0.8"), date(2026, 3, 1), date(2026, 3, 15), 1),
        Voucher("V2", "DIST", "F3", Decimal("300.00"), Decimal("1"), date(2026, 1, 1), date(2026, 12, 31), 1),
    ]
    full = net_items(items, programs, vouchers)
    quick = net_items(items, programs, vouchers, explain=False)
    assert full.trail and not quick.trail
    assert quick.credits == full.credits and quick.auto_granted == full.auto_granted
    assert quick.state_after == full.state_after
    assert sum(c.amount for c in full.credits) > 0
