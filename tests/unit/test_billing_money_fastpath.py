"""The integer fast paths of charge and subsidy amounts equal the exact Fraction definitions."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.core.money import (
    MoneyFormatError,
    charge_amount,
    from_cents,
    gpu_hours_of,
    round_fraction_to_cent,
    subsidy_cents,
    to_cents,
)

prices = st.decimals(min_value=Decimal(0), max_value=Decimal("100000"), places=4, allow_nan=False)
money = st.decimals(min_value=Decimal(0), max_value=Decimal("10000000"), places=2, allow_nan=False)
rates = st.decimals(min_value=Decimal("0.0001"), max_value=Decimal(1), places=4, allow_nan=False)


@given(st.integers(0, 10**9), prices)
def test_charge_amount_equals_exact_definition(seconds: int, price: Decimal) -> None:
    assert charge_amount(seconds, price) == round_fraction_to_cent(gpu_hours_of(seconds) * Fraction(price))


@given(rates, money)
def test_subsidy_in_fen_equals_exact_definition(rate: Decimal, uncovered: Decimal) -> None:
    cents = subsidy_cents(rate.as_integer_ratio(), to_cents(uncovered))
    assert from_cents(cents) == round_fraction_to_cent(Fraction(rate) * Fraction(uncovered))


@given(money)
def test_fen_round_trip(amount: Decimal) -> None:
    assert from_cents(to_cents(amount)) == amount
    assert str(from_cents(to_cents(amount))) == str(amount.quantize(Decimal("0.01")))


def test_to_cents_refuses_below_the_fen() -> None:
    assert to_cents(Decimal("12.5")) == 1250
    with pytest.raises(MoneyFormatError):
        to_cents(Decimal("0.001"))


def test_half_up_at_the_half_cent() -> None:
    assert charge_amount(18, Decimal("0.01")) == Decimal("0.00")  # 0.00005 -> 0.00
    assert charge_amount(1800, Decimal("0.01")) == Decimal("0.01")  # 0.005 -> 0.01
    assert subsidy_cents((1, 2), 1) == 1  # 0.005 -> 0.01
    assert subsidy_cents((3, 10), 5) == 2  # 0.015 -> 0.02
    assert subsidy_cents((3, 10), 4) == 1  # 0.012 -> 0.01
