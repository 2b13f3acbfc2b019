"""Each shortcut in ``billing/core/fastpath.py`` equals the plain definition it stands in for."""

from __future__ import annotations

import gc
from datetime import date
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.core.fastpath import CheckedTexts, cached_isoformat, paused_cyclic_gc, unchecked_builder
from billing.core.model import (
    ChargeItem,
    Credit,
    InvalidBillingDataError,
    ItemKey,
    Rate,
    UsageAggregate,
    check_text,
    month_of,
)
from billing.core.money import charge_amount
from billing.core.pricing import RateCard

ids = st.text(alphabet="ABCFHP0123456789-", min_size=1, max_size=8)
days = st.dates(min_value=date(2024, 1, 1), max_value=date(2027, 12, 31))
counts = st.integers(min_value=0, max_value=10**9)
prices = st.decimals(min_value=Decimal(0), max_value=Decimal("999.9999"), places=4, allow_nan=False)


@given(ids, days, ids, ids, counts, counts, counts, counts, prices, st.booleans())
def test_a_priced_item_equals_the_checked_constructor(
    firm: str, day: date, provider: str, cls: str, seconds: int, records: int, busy: int, energy: int,
    price: Decimal, late: bool,
) -> None:  # fmt: skip
    adjustment = f"{day.year:04d}-{day.month:02d}" if late else None
    usage = UsageAggregate(firm, day, provider, cls, seconds, records, busy, energy, adjustment)
    amount = charge_amount(seconds, price)
    fast = ChargeItem.priced(usage, seconds, records, busy, energy, price, amount)
    plain = ChargeItem(firm, day, provider, cls, seconds, price, amount, records, busy, energy, adjustment)
    assert fast == plain
    assert fast.key == plain.key == ItemKey(day, firm, provider, cls, adjustment)
    assert [getattr(fast, f) for f in ChargeItem.__slots__] == [getattr(plain, f) for f in ChargeItem.__slots__]


@given(ids, days, ids, ids, st.integers(min_value=1, max_value=10**9), ids, ids)
def test_a_drawn_credit_equals_the_checked_constructor(
    firm: str, day: date, provider: str, cls: str, fen: int, voucher: str, program: str
) -> None:
    key = ItemKey(day, firm, provider, cls)
    amount = Decimal(fen).scaleb(-2)
    assert Credit.drawn(key, voucher, program, amount) == Credit(key, voucher, program, firm, amount)


def test_an_unchecked_builder_sets_every_field_and_skips_only_the_checks() -> None:
    build = unchecked_builder(Credit)
    key = ItemKey(date(2026, 3, 1), "F1", "P1", "H100")
    credit = build(key, "V1", "PR", "F1", Decimal("1.00"))
    assert credit == Credit(key, "V1", "PR", "F1", Decimal("1.00"))
    with pytest.raises(InvalidBillingDataError):
        Credit(key, "V1", "PR", "F1", Decimal("0"))  # the checked constructor refuses a zero credit
    assert build(key, "V1", "PR", "F1", Decimal("0")).amount == 0  # the builder does not check: fast paths only


texts = st.one_of(st.text(max_size=6), st.integers(), st.none(), st.just(" x"), st.just("x "), st.just(""))


@given(st.lists(texts, max_size=30))
def test_checked_texts_give_the_plain_verdict_every_time(values: list[object]) -> None:
    cached = CheckedTexts(check_text, limit=5)
    for value in values * 2:  # the second round hits the cache for every good value
        try:
            check_text(value, "id")
            plain_ok = True
        except InvalidBillingDataError:
            plain_ok = False
        try:
            cached.verify(value, "id")
            fast_ok = True
        except InvalidBillingDataError:
            fast_ok = False
        assert fast_ok == plain_ok, value


@given(st.lists(days, max_size=50))
def test_cached_isoformat_is_isoformat(values: list[date]) -> None:
    iso = cached_isoformat()
    assert [iso(d) for d in values * 2] == [d.isoformat() for d in values * 2]


@pytest.mark.parametrize("enabled", [True, False])
def test_the_collector_is_paused_and_restored_even_on_error(enabled: bool) -> None:
    (gc.enable if enabled else gc.disable)()
    try:
        with pytest.raises(RuntimeError), paused_cyclic_gc():
            assert not gc.isenabled()
            raise RuntimeError("boom")
        assert gc.isenabled() == enabled
    finally:
        gc.enable()


@given(st.lists(days, max_size=60))
def test_the_memoised_month_of_is_the_plain_month(values: list[date]) -> None:
    assert [month_of(d) for d in values * 2] == [f"{d.year:04d}-{d.month:02d}" for d in values * 2]


rate_rows = st.lists(
    st.tuples(st.sampled_from(["H100", "A800"]), st.sampled_from(["*", "P1", "P2"]), days, prices),
    max_size=12,
    unique_by=lambda r: (r[0], r[1], r[2]),
)


@given(rate_rows, st.lists(st.tuples(st.sampled_from(["P1", "P2", "P3"]), st.sampled_from(["H100", "A800"]), days)))
def test_the_memoised_rate_lookup_is_the_plain_selection(
    rows: list[tuple[str, str, date, Decimal]], queries: list[tuple[str, str, date]]
) -> None:
    card = RateCard([Rate(c, p, price, d) for c, p, d, price in rows])
    for provider, cls, day in queries * 2:  # the second round answers from the memo
        assert card.rate_for(provider, cls, day) == card._select(provider, cls, day)
