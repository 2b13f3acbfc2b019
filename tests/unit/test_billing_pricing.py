"""Money helpers, model validation and pricing (docs/billing-rules.md sections 1-2)."""

from __future__ import annotations

import random
from datetime import date
from decimal import ROUND_HALF_UP, Decimal, localcontext
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.core.model import AutoGrant, ChargeItem, InvalidBillingDataError, Rate, UsageAggregate, Voucher
from billing.core.money import (
    MoneyFormatError,
    charge_amount,
    format_gpu_hours,
    parse_money,
    parse_price,
    parse_subsidy_rate,
    round_fraction_half_up,
    round_money,
)
from billing.core.pricing import RateCardConflictError, UnpricedUsage, UnpricedUsageError, price_items

D = Decimal
HOUR = 3600


def usage(
    day: date,
    seconds: int = HOUR,
    *,
    firm: str = "F1",
    provider: str = "P1",
    gpu_class: str = "A100",
    adjustment_for: str | None = None,
) -> UsageAggregate:
    return UsageAggregate(firm, day, provider, gpu_class, seconds, 1, adjustment_for=adjustment_for)


def rate(price: str, since: date, provider: str = "*", gpu_class: str = "A100") -> Rate:
    return Rate(gpu_class, provider, D(price), since)


# ----------------------------------------------------------------- money


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.005", "0.01"),
        ("0.015", "0.02"),
        ("0.004999", "0.00"),
        ("2.675", "2.68"),  # the classic float trap: float(2.675) rounds to 2.67
        ("-0.005", "-0.01"),
        ("7", "7.00"),
    ],
    ids=["half-up-at-.005", "half-up-odd", "below-half", "float-trap", "negative-away-from-zero", "int"],
)
def test_round_money_is_half_up(value: str, expected: str) -> None:
    assert str(round_money(D(value))) == expected


@pytest.mark.parametrize(
    ("value", "places", "expected"),
    [
        (Fraction(1, 200), 2, "0.01"),
        (Fraction(1, 3), 2, "0.33"),
        (Fraction(2, 3), 2, "0.67"),
        (Fraction(-1, 200), 2, "-0.01"),
        (Fraction(-1, 300), 2, "0.00"),
        (Fraction(1, 3600), 6, "0.000278"),
        (Fraction(0), 2, "0.00"),
    ],
    ids=["half", "third", "two-thirds", "negative-half", "negative-to-zero", "one-second-hours", "zero"],
)
def test_round_fraction_half_up(value: Fraction, places: int, expected: str) -> None:
    assert str(round_fraction_half_up(value, places)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("12.5", "12.50"), ("0", "0.00"), (" 7.25 ", "7.25"), ("1000000", "1000000.00")],
    ids=["one-place", "zero", "spaces", "large"],
)
def test_parse_money_accepts_plain_decimals(text: str, expected: str) -> None:
    assert str(parse_money(text)) == expected


@pytest.mark.parametrize(
    "text",
    ["1e3", "NaN", "inf", "-Infinity", "-1", "1.005", "1,000", "", "+1", ".5", "1.", "1 000", "0x10"],
    ids=lambda t: repr(t),
)
def test_parse_money_rejects(text: str) -> None:
    with pytest.raises(MoneyFormatError):
        parse_money(text)


def test_parse_money_rejects_non_text() -> None:
    with pytest.raises(MoneyFormatError, match="must be given as text"):
        parse_money(1.5)  # type: ignore[arg-type]


def test_parse_money_negative_only_when_allowed() -> None:
    assert parse_money("-1.2", allow_negative=True) == D("-1.20")


@pytest.mark.parametrize(
    ("text", "ok"),
    [("0", False), ("0.3", True), ("1", True), ("1.01", False), ("-0.5", False)],
    ids=["zero", "thirty-percent", "one", "above-one", "negative"],
)
def test_parse_subsidy_rate_bounds(text: str, ok: bool) -> None:
    if ok:
        assert parse_subsidy_rate(text) == D(text)
    else:
        with pytest.raises(MoneyFormatError):
            parse_subsidy_rate(text)


def test_parse_price_keeps_every_place() -> None:
    assert str(parse_price("2.345678")) == "2.345678"


def test_charge_amount_is_exact_where_decimal_division_is_not() -> None:
    # 5 s x 3.5999999999999999999999999999 / 3600 = 0.00499999...98 exactly -> 0.00.
    # Decimal at 28 digits computes 0.005000..., which half-up would bill as 0.01.
    price = D("3.5999999999999999999999999999")
    naive = (D(5) * price / D(3600)).quantize(D("0.01"), rounding=ROUND_HALF_UP)
    assert naive == D("0.01")
    assert charge_amount(5, price) == D("0.00")


@given(st.integers(0, 10**7), st.decimals(min_value=0, max_value=10**4, places=6))
def test_charge_amount_matches_high_precision_oracle(seconds: int, price: Decimal) -> None:
    with localcontext() as ctx:
        ctx.prec = 200
        oracle = (D(seconds) * price / D(3600)).quantize(D("0.01"), rounding=ROUND_HALF_UP)
    assert charge_amount(seconds, price) == oracle


# ----------------------------------------------------------------- model validation


@pytest.mark.parametrize(
    "build",
    [
        lambda: Voucher("V", "P", "F", D("10"), D("0"), date(2025, 1, 1), date(2025, 2, 1), 1),
        lambda: Voucher("V", "P", "F", D("10"), D("1.5"), date(2025, 1, 1), date(2025, 2, 1), 1),
        lambda: Voucher("V", "P", "F", D("10.001"), D("1"), date(2025, 1, 1), date(2025, 2, 1), 1),
        lambda: Voucher("V", "P", "F", 10.0, D("1"), date(2025, 1, 1), date(2025, 2, 1), 1),  # type: ignore[arg-type]
        lambda: Voucher("V", "P", "F", D("10"), D("1"), date(2025, 3, 1), date(2025, 2, 1), 1),
        lambda: AutoGrant(D("NaN"), D("0.5")),
        lambda: Rate("A100", "*", D("-1"), date(2025, 1, 1)),
        lambda: UsageAggregate("F", date(2025, 3, 1), "*", "A100", 1, 1),
        lambda: UsageAggregate("F", date(2025, 3, 1), "P", "A100", -1, 1),
        lambda: UsageAggregate("F", date(2025, 3, 1), "P", "A100", 1, 1, adjustment_for="2025-02"),
        lambda: UsageAggregate("F", date(2025, 3, 1), "P", "A100", 1, 1, adjustment_for="2025-3"),
        lambda: ChargeItem("F", date(2025, 3, 1), "P", "A100", 10, D("1"), D("0.001"), 1),
    ],
    ids=[
        "rate-zero",
        "rate-above-one",
        "face-three-places",
        "float-face-value",
        "valid-from-after-until",
        "nan-money",
        "negative-price",
        "usage-provider-star",
        "negative-seconds",
        "adjustment-month-not-day-month",
        "malformed-adjustment-month",
        "amount-below-the-fen",
    ],
)
def test_model_refuses_bad_values(build: object) -> None:
    assert callable(build)
    with pytest.raises(InvalidBillingDataError):
        build()


# ----------------------------------------------------------------- rate selection

JAN1, MAR1, MAR15, MAR16, APR1 = (
    date(2025, 1, 1),
    date(2025, 3, 1),
    date(2025, 3, 15),
    date(2025, 3, 16),
    date(2025, 4, 1),
)


@pytest.mark.parametrize(
    ("rates", "provider", "day", "expected_price"),
    [
        ([rate("10.00", JAN1)], "P1", MAR1, "10.00"),
        ([rate("10.00", JAN1), rate("8.00", JAN1, "P1")], "P1", MAR1, "8.00"),
        ([rate("10.00", JAN1), rate("8.00", JAN1, "P1")], "P2", MAR1, "10.00"),
        # the provider's own rates win even when a newer '*' rate exists
        ([rate("8.00", JAN1, "P1"), rate("12.00", MAR1)], "P1", MAR15, "8.00"),
        # a provider rate not yet in effect does not count: fall back to '*'
        ([rate("10.00", JAN1), rate("8.00", APR1, "P1")], "P1", MAR15, "10.00"),
        ([rate("10.00", JAN1), rate("8.00", APR1, "P1")], "P1", APR1, "8.00"),
        # rate change mid-month: effective_from is inclusive
        ([rate("10.00", JAN1), rate("12.00", MAR16)], "P1", MAR15, "10.00"),
        ([rate("10.00", JAN1), rate("12.00", MAR16)], "P1", MAR16, "12.00"),
        # rates of another gpu_class are irrelevant
        ([rate("10.00", JAN1), rate("99.00", MAR1, "P1", "H100")], "P1", MAR15, "10.00"),
    ],
    ids=[
        "star-only",
        "provider-overrides-star",
        "other-provider-uses-star",
        "own-rate-beats-newer-star",
        "own-rate-not-yet-effective",
        "own-rate-effective-on-its-day",
        "change-mid-month-day-before",
        "change-mid-month-first-day",
        "other-class-ignored",
    ],
)
def test_rate_selection(rates: list[Rate], provider: str, day: date, expected_price: str) -> None:
    (item,) = price_items([usage(day, provider=provider)], rates)
    assert item.unit_price == D(expected_price)
    assert item.amount == D(expected_price)  # one hour


def test_unpriced_usage_lists_every_key_sorted() -> None:
    rates = [rate("10.00", MAR16), rate("9.00", JAN1, "P1", "H100")]
    aggregates = [
        usage(MAR16, provider="P2", gpu_class="H100"),
        usage(MAR15, provider="P2", gpu_class="A100"),
        usage(MAR16, firm="F2", provider="P2", gpu_class="H100"),  # same key twice: listed once
        usage(MAR16, provider="P1", gpu_class="A100"),  # priced
        usage(MAR1, provider="P1", gpu_class="L40"),
    ]
    with pytest.raises(UnpricedUsageError) as info:
        price_items(aggregates, rates)
    assert info.value.unpriced == (
        UnpricedUsage("P1", "L40", MAR1),
        UnpricedUsage("P2", "A100", MAR15),
        UnpricedUsage("P2", "H100", MAR16),
    )
    assert info.value.code == "unpriced_usage"
    assert str(info.value) == (
        "no price for 3 usage key(s): (provider=P1, gpu_class=L40, day=2025-03-01), "
        "(provider=P2, gpu_class=A100, day=2025-03-15), (provider=P2, gpu_class=H100, day=2025-03-16)"
    )


def test_conflicting_rates_are_refused_identical_ones_tolerated() -> None:
    assert price_items([usage(MAR1)], [rate("10.00", JAN1), rate("10.00", JAN1)])[0].amount == D("10.00")
    with pytest.raises(RateCardConflictError):
        price_items([usage(MAR1)], [rate("10.00", JAN1), rate("11.00", JAN1)])


def test_explicit_zero_price_bills_zero() -> None:
    (item,) = price_items([usage(MAR1)], [rate("0", JAN1)])
    assert item.amount == D("0.00")


def test_item_amount_is_rounded_once_from_exact_total_hours() -> None:
    # Two aggregates of 18 s each at 1.00/h: 0.005 each (would be 0.01 + 0.01 if rounded
    # separately); one item of 36 s = 0.01 h -> 0.01.
    items = price_items([usage(MAR1, 18), usage(MAR1, 18)], [rate("1.00", JAN1)])
    assert [(i.allocated_seconds, i.gpu_hours, i.amount) for i in items] == [(36, Fraction(1, 100), D("0.01"))]


def test_half_up_at_half_cent() -> None:
    # 1800 s x 0.07 / 3600 = 0.035 exactly -> 0.04 (half-even would give 0.04 too, so also
    # check 0.025 -> 0.03 where half-even would give 0.02)
    assert price_items([usage(MAR1, 1800)], [rate("0.07", JAN1)])[0].amount == D("0.04")
    assert price_items([usage(MAR1, 1800)], [rate("0.05", JAN1)])[0].amount == D("0.03")


def test_late_usage_is_its_own_item_never_merged_with_current() -> None:
    feb = date(2025, 2, 28)
    items = price_items(
        [usage(feb, 18, adjustment_for="2025-02"), usage(feb, 18)],
        [rate("1.00", JAN1)],
    )
    assert [(i.adjustment_for, i.amount) for i in items] == [(None, D("0.01")), ("2025-02", D("0.01"))]


def test_gpu_hours_display_rounds_half_up_to_six_places() -> None:
    assert format_gpu_hours(Fraction(1, 3600)) == "0.000278"
    assert format_gpu_hours(Fraction(2, 3600)) == "0.000556"
    assert format_gpu_hours(Fraction(9, 3600)) == "0.002500"


aggregate_lists = st.lists(
    st.builds(
        UsageAggregate,
        firm_id=st.sampled_from(["F1", "F2"]),
        day=st.dates(date(2025, 2, 25), date(2025, 3, 5)),
        provider_id=st.sampled_from(["P1", "P2"]),
        gpu_class=st.sampled_from(["A100", "H100"]),
        allocated_seconds=st.integers(0, 10**6),
        record_count=st.integers(1, 5),
    ),
    max_size=15,
)
RATES = [rate("10.00", JAN1), rate("7.5", MAR1, "P2"), rate("31.1234", JAN1, gpu_class="H100")]


@given(aggregate_lists, st.randoms(use_true_random=False))
def test_pricing_ignores_input_order(aggregates: list[UsageAggregate], rnd: random.Random) -> None:
    shuffled = list(aggregates)
    rnd.shuffle(shuffled)
    shuffled_rates = list(RATES)
    rnd.shuffle(shuffled_rates)
    assert price_items(shuffled, shuffled_rates) == price_items(aggregates, RATES)


@given(aggregate_lists)
def test_pricing_conserves_seconds_and_orders_items(aggregates: list[UsageAggregate]) -> None:
    items = price_items(aggregates, RATES)
    assert sum(i.allocated_seconds for i in items) == sum(a.allocated_seconds for a in aggregates)
    assert [i.key.netting_order for i in items] == sorted(i.key.netting_order for i in items)
    assert len({i.key for i in items}) == len(items)
    for item in items:
        assert item.amount == charge_amount(item.allocated_seconds, item.unit_price)
