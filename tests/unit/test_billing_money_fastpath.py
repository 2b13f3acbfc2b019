"""The integer fast paths of charge and subsidy amounts equal the exact Fraction definitions."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from billing.money import charge_amount, gpu_hours_of, round_fraction_to_cent, subsidy_amount

prices = st.decimals(min_value=Decimal(0), max_value=Decimal("100000"), places=4, allow_nan=False)
money = st.decimals(min_value=Decimal(0), max_value=Decimal("10000000"), places=2, allow_nan=False)
rates = st.decimals(min_value=Decimal("0.0001"), max_value=Decimal(1), places=4, allow_nan=False)


@given(st.integers(0, 10**9), prices)
def test_charge_amount_equals_exact_definition(seconds: int, price: Decimal) -> None:
    assert charge_amount(seconds, price) == round_fraction_to_cent(gpu_hours_of(seconds) * Fraction(price))


@given(rates, money)
def test_subsidy_amount_equals_exact_definition(rate: Decimal, uncovered: Decimal) -> None:
    assert subsidy_amount(rate, uncovered) == round_fraction_to_cent(Fraction(rate) * Fraction(uncovered))


def test_half_up_at_the_half_cent() -> None:
    assert charge_amount(18, Decimal("0.01")) == Decimal("0.00")  # 0.00005 -> 0.00
    assert charge_amount(1800, Decimal("0.01")) == Decimal("0.01")  # 0.005 -> 0.01
    assert subsidy_amount(Decimal("0.5"), Decimal("0.01")) == Decimal("0.01")  # 0.005 -> 0.01
    assert subsidy_amount(Decimal("0.3"), Decimal("0.05")) == Decimal("0.02")  # 0.015 -> 0.02
