"""Voucher netting (docs/billing-rules.md section 3): worked examples and properties."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import date
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.core.model import AutoGrant, ChargeItem, InvalidBillingDataError, Program, Voucher
from billing.core.netting import NettingResult, NettingState, net_items

D = Decimal
Y25_START, Y25_END = date(2025, 1, 1), date(2025, 12, 31)


def item(firm: str, day: date, amount: str, provider: str = "P1", gpu_class: str = "A100") -> ChargeItem:
    """One GPU-hour priced at ``amount``, so the item's amount is exactly ``amount``."""
    return ChargeItem(firm, day, provider, gpu_class, 3600, D(amount), D(amount), 1)


def program(
    pid: str = "SH25",
    *,
    year: int = 2025,
    budget: str = "1000000.00",
    cap: str = "1000000.00",
    category: str = "compute",
    auto: AutoGrant | None = None,
) -> Program:
    return Program(pid, year, category, D(budget), D(cap), auto)


def voucher(
    vid: str,
    firm: str = "F1",
    *,
    pid: str = "SH25",
    face: str = "1000000.00",
    rate: str = "1",
    start: date = Y25_START,
    end: date = Y25_END,
    priority: int = 1,
) -> Voucher:
    return Voucher(vid, pid, firm, D(face), D(rate), start, end, priority)


def credited(result: NettingResult) -> list[tuple[str, date, str, Decimal]]:
    return [(c.firm_id, c.item.day, c.voucher_id, c.amount) for c in result.credits]


def mar(day: int) -> date:
    return date(2025, 3, day)


# ----------------------------------------------------------------- worked examples


def test_thirty_percent_with_firm_cap_biting_mid_item() -> None:
    # cap 50.00, 30% voucher. 03-01: 30% of 100.00 = 30.00 (cap left 20.00).
    # 03-02: subsidy 30.00 but cap left 20.00 -> 20.00. 03-03: cap left 0 -> nothing.
    result = net_items(
        [item("F1", mar(3), "100.00"), item("F1", mar(1), "100.00"), item("F1", mar(2), "100.00")],
        [program(cap="50.00")],
        [voucher("V1", rate="0.30", face="500.00")],
    )
    assert credited(result) == [("F1", mar(1), "V1", D("30.00")), ("F1", mar(2), "V1", D("20.00"))]
    assert [(s.item.day, s.subsidy, s.credit, s.limited_by) for s in result.trail] == [
        (mar(1), D("30.00"), D("30.00"), "subsidy"),
        (mar(2), D("30.00"), D("20.00"), "firm_cap"),
        (mar(3), D("30.00"), D("0.00"), "firm_cap"),
    ]
    assert result.state_after.drawn_by_firm_program == {("F1", "SH25"): D("50.00")}


def test_pool_exhausts_mid_day_across_two_firms_in_firm_id_order() -> None:
    # budget 50.00, both 100%. Same day: F-A (30.00) before F-B (30.00) by firm_id, even
    # though F-B's provider P0 sorts before P9: F-A gets 30.00, F-B the 20.00 left;
    # F-A's next day gets nothing.
    result = net_items(
        [
            item("F-B", mar(1), "30.00", provider="P0"),
            item("F-A", mar(2), "10.00"),
            item("F-A", mar(1), "30.00", provider="P9"),
        ],
        [program(budget="50.00")],
        [voucher("VB", "F-B"), voucher("VA", "F-A")],
    )
    assert credited(result) == [("F-A", mar(1), "VA", D("30.00")), ("F-B", mar(1), "VB", D("20.00"))]
    assert result.trail[1].limited_by == "program_budget"
    assert result.state_after.drawn_by_program == {"SH25": D("50.00")}


def test_pool_drains_in_the_order_usage_happened() -> None:
    # F-B used first (03-01) so it is covered first, although F-A sorts first by id.
    result = net_items(
        [item("F-A", mar(2), "40.00"), item("F-B", mar(1), "40.00")],
        [program(budget="50.00")],
        [voucher("VA", "F-A"), voucher("VB", "F-B")],
    )
    assert credited(result) == [("F-B", mar(1), "VB", D("40.00")), ("F-A", mar(2), "VA", D("10.00"))]


def test_voucher_expiring_mid_month() -> None:
    # V1 50% valid until 03-15 (inclusive); V2 20%, priority 2, valid all year.
    # 03-15: V1 50% of 100.00 = 50.00; V2 20% of the 50.00 left = 10.00.
    # 03-16: V1 expired; V2 20% of 100.00 = 20.00.
    result = net_items(
        [item("F1", mar(15), "100.00"), item("F1", mar(16), "100.00")],
        [program()],
        [voucher("V1", rate="0.5", end=mar(15)), voucher("V2", rate="0.2", priority=2)],
    )
    assert credited(result) == [
        ("F1", mar(15), "V1", D("50.00")),
        ("F1", mar(15), "V2", D("10.00")),
        ("F1", mar(16), "V2", D("20.00")),
    ]


def test_year_boundary_uses_the_program_of_the_items_year() -> None:
    # V25 (program year 2025) stays *valid* into 2026, but only nets 2025 items;
    # V26 (program year 2026) nets from Jan 1 on.
    dec31, jan1 = date(2025, 12, 31), date(2026, 1, 1)
    result = net_items(
        [item("F1", jan1, "100.00"), item("F1", dec31, "100.00")],
        [program("SH25"), program("SH26", year=2026)],
        [
            voucher("V25", rate="0.5", end=date(2026, 3, 31)),
            voucher("V26", pid="SH26", rate="0.3", start=jan1, end=date(2026, 12, 31)),
        ],
    )
    assert credited(result) == [("F1", dec31, "V25", D("50.00")), ("F1", jan1, "V26", D("30.00"))]


def test_half_up_rounding_at_half_a_fen() -> None:
    # item 0.03: V1 50% -> 0.015 -> 0.02; V2 50% of the 0.01 left -> 0.005 -> 0.01. Covered.
    result = net_items(
        [item("F1", mar(1), "0.03")],
        [program()],
        [voucher("V1", rate="0.5"), voucher("V2", rate="0.5", priority=2)],
    )
    assert [c.amount for c in result.credits] == [D("0.02"), D("0.01")]


@pytest.mark.parametrize(
    ("vouchers", "expected_order"),
    [
        ([voucher("VB", priority=2), voucher("VA", priority=1)], ["VA", "VB"]),
        ([voucher("VA", end=mar(31)), voucher("VB", end=mar(20))], ["VB", "VA"]),
        ([voucher("VB", end=mar(31)), voucher("VA", end=mar(31))], ["VA", "VB"]),
    ],
    ids=["priority-first", "then-earliest-valid-until", "then-voucher-id"],
)
def test_voucher_try_order(vouchers: list[Voucher], expected_order: list[str]) -> None:
    small = [
        Voucher(
            v.voucher_id,
            v.program_id,
            v.firm_id,
            D("10.00"),
            v.subsidy_rate,
            v.valid_from,
            v.valid_until,
            v.priority,
        )
        for v in vouchers
    ]
    result = net_items([item("F1", mar(1), "15.00")], [program()], small)
    assert [(c.voucher_id, c.amount) for c in result.credits] == [
        (expected_order[0], D("10.00")),
        (expected_order[1], D("5.00")),
    ]


@pytest.mark.parametrize(
    ("programs", "vouchers"),
    [
        ([program(category="model")], [voucher("V1")]),
        ([program()], [voucher("V1", firm="F2")]),
        ([program()], [voucher("V1", start=mar(2))]),
        ([program(year=2024)], [voucher("V1", start=date(2024, 1, 1))]),
        ([program()], [voucher("V1", face="0.00")]),
    ],
    ids=["non-compute-program", "other-firm", "not-yet-valid", "program-of-other-year", "zero-face"],
)
def test_ineligible_vouchers_give_nothing(programs: list[Program], vouchers: list[Voucher]) -> None:
    result = net_items([item("F1", mar(1), "10.00")], programs, vouchers)
    assert result.credits == () and result.trail == ()


@pytest.mark.parametrize(
    ("state", "expected_credit"),
    [
        (NettingState(drawn_by_voucher={"V1": D("95.00")}), "5.00"),
        (NettingState(drawn_by_firm_program={("F1", "SH25"): D("97.00")}), "3.00"),
        (NettingState(drawn_by_program={"SH25": D("99.00")}), "1.00"),
        (NettingState(drawn_by_firm_program={("F2", "SH25"): D("97.00")}), "10.00"),
        (NettingState(drawn_by_program={"SH25": D("150.00")}), None),  # budget lowered below use
    ],
    ids=["voucher-balance", "firm-cap", "program-budget", "other-firms-cap-irrelevant", "over-budget"],
)
def test_carried_state_limits_credit(state: NettingState, expected_credit: str | None) -> None:
    result = net_items(
        [item("F1", mar(1), "10.00")],
        [program(budget="100.00", cap="100.00")],
        [voucher("V1", face="100.00")],
        state,
    )
    assert [c.amount for c in result.credits] == ([D(expected_credit)] if expected_credit else [])


# ----------------------------------------------------------------- auto-grant

AUTO = AutoGrant(D("100.00"), D("0.5"))


def test_auto_grant_created_at_first_sight_and_used_for_the_whole_settlement() -> None:
    result = net_items(
        [item("F1", mar(1), "10.00"), item("F1", mar(31), "10.00")],
        [program(auto=AUTO)],
        [],
    )
    assert result.auto_granted == (
        Voucher("AUTO-SH25-F1", "SH25", "F1", D("100.00"), D("0.5"), Y25_START, Y25_END, 1000),
    )
    assert credited(result) == [
        ("F1", mar(1), "AUTO-SH25-F1", D("5.00")),
        ("F1", mar(31), "AUTO-SH25-F1", D("5.00")),
    ]


def test_auto_grant_is_tried_after_own_vouchers() -> None:
    # V1 (priority 1) 50% first: 5.00; then AUTO (priority 1000) 50% of 5.00 left: 2.50.
    result = net_items(
        [item("F2", mar(1), "10.00")],
        [program(auto=AUTO), program("X")],
        [voucher("V1", "F2", pid="X", rate="0.5")],
    )
    assert [(c.voucher_id, c.amount) for c in result.credits] == [
        ("V1", D("5.00")),
        ("AUTO-SH25-F2", D("2.50")),
    ]


@pytest.mark.parametrize(
    ("programs", "vouchers", "items", "expected_ids"),
    [
        ([program(auto=AUTO)], [voucher("OLD", face="0.00", end=mar(1))], [item("F1", mar(20), "1")], []),
        ([program(auto=AUTO)], [voucher("AUTO-SH25-F1")], [item("F1", mar(20), "1")], []),
        (
            [program(auto=AUTO), program("X")],
            [voucher("V", pid="X")],
            [item("F1", mar(2), "1")],
            ["AUTO-SH25-F1"],
        ),
        ([program(auto=AUTO, category="model")], [], [item("F1", mar(2), "1")], []),
        ([program(auto=AUTO, year=2026)], [], [item("F1", mar(2), "1")], []),
        (
            [program(auto=AUTO)],
            [],
            [item("F2", mar(2), "1"), item("F1", mar(3), "1")],
            ["AUTO-SH25-F1", "AUTO-SH25-F2"],
        ),
        (
            [program(auto=AUTO)],
            [],
            [ChargeItem("F1", mar(2), "P1", "A100", 0, D("1"), D("0"), 1)],
            [],
        ),
    ],
    ids=[
        "holds-expired-exhausted-voucher",
        "already-auto-granted",
        "holds-voucher-of-other-program-only",
        "non-compute-program",
        "usage-outside-program-year",
        "two-firms-sorted",
        "zero-second-item-is-not-usage",
    ],
)
def test_auto_grant_rule(
    programs: list[Program], vouchers: list[Voucher], items: list[ChargeItem], expected_ids: list[str]
) -> None:
    result = net_items(items, programs, vouchers)
    assert [v.voucher_id for v in result.auto_granted] == expected_ids


def test_auto_grant_id_taken_by_another_firm_is_refused() -> None:
    with pytest.raises(InvalidBillingDataError, match="AUTO-SH25-F1"):
        net_items([item("F1", mar(1), "1")], [program(auto=AUTO)], [voucher("AUTO-SH25-F1", "F9")])


@pytest.mark.parametrize(
    ("items", "vouchers"),
    [
        ([item("F1", mar(1), "1"), item("F1", mar(1), "2")], []),
        ([item("F1", mar(1), "1")], [voucher("V1", pid="NOPE")]),
        ([item("F1", mar(1), "1")], [voucher("V1"), voucher("V1", rate="0.5")]),
    ],
    ids=["duplicate-item-key", "unknown-program", "two-vouchers-one-id"],
)
def test_inconsistent_inputs_are_refused(items: list[ChargeItem], vouchers: list[Voucher]) -> None:
    with pytest.raises(InvalidBillingDataError):
        net_items(items, [program()], vouchers)


def test_state_drawing_from_a_voucher_not_given_is_refused() -> None:
    # e.g. the caller forgot to pass the auto-grants it persisted after the last settlement
    state = NettingState(drawn_by_voucher={"AUTO-SH25-F1": D("5.00")})
    with pytest.raises(InvalidBillingDataError, match="AUTO-SH25-F1"):
        net_items([item("F1", mar(1), "1")], [program(auto=AUTO)], [], state)


# ----------------------------------------------------------------- properties

FIRMS = ["F1", "F2", "F3"]
DAYS = st.dates(date(2025, 12, 20), date(2026, 1, 12))
money = st.integers(0, 50_000).map(lambda cents: Decimal(cents).scaleb(-2))
rates = st.sampled_from(["0.1", "0.3", "0.333", "0.5", "0.75", "1"]).map(Decimal)


@st.composite
def scenario(draw: st.DrawFn) -> tuple[list[ChargeItem], list[Program], list[Voucher]]:
    programs = []
    for pid, year in [("P25", 2025), ("P26", 2026), ("M26", 2026)]:
        auto = draw(st.none() | st.builds(AutoGrant, money, rates))
        category = "model" if pid == "M26" else "compute"
        programs.append(Program(pid, year, category, draw(money), draw(money), auto))
    vouchers = []
    for n in range(draw(st.integers(0, 6))):
        pid = draw(st.sampled_from(["P25", "P26", "M26"]))
        start = draw(DAYS)
        vouchers.append(
            Voucher(
                f"V{n}",
                pid,
                draw(st.sampled_from(FIRMS)),
                draw(money),
                draw(rates),
                start,
                draw(st.dates(start, date(2026, 2, 1))),
                draw(st.integers(0, 3)),
            )
        )
    keys = draw(
        st.lists(st.tuples(st.sampled_from(FIRMS), DAYS, st.sampled_from(["P1", "P2"])), unique=True, max_size=12)
    )
    items = [
        ChargeItem(firm, day, provider, "A100", 3600, amount, amount, 1)
        for (firm, day, provider), amount in zip(keys, draw(st.lists(money, min_size=len(keys))), strict=False)
    ]
    return items, programs, vouchers


def assert_invariants(
    items: list[ChargeItem],
    programs: list[Program],
    vouchers: list[Voucher],
    result: NettingResult,
    state: NettingState,
) -> None:
    by_item: dict[object, Decimal] = defaultdict(Decimal)
    for credit in result.credits:
        by_item[credit.item] += credit.amount
    for it in items:
        assert by_item[it.key] <= it.amount
    all_vouchers = {v.voucher_id: v for v in [*vouchers, *result.auto_granted]}
    for vid, drawn in state.drawn_by_voucher.items():
        assert drawn <= all_vouchers[vid].face_value
    prog = {p.program_id: p for p in programs}
    for (_, pid), drawn in state.drawn_by_firm_program.items():
        assert drawn <= prog[pid].firm_cap
    for pid, drawn in state.drawn_by_program.items():
        assert drawn <= prog[pid].budget
    for credit in result.credits:
        v = all_vouchers[credit.voucher_id]
        assert credit.amount > 0 and v.firm_id == credit.firm_id
        assert v.valid_from <= credit.item.day <= v.valid_until
        assert prog[v.program_id].category == "compute" and prog[v.program_id].year == credit.item.day.year


@settings(max_examples=300)
@given(scenario())
def test_netting_invariants(case: tuple[list[ChargeItem], list[Program], list[Voucher]]) -> None:
    items, programs, vouchers = case
    result = net_items(items, programs, vouchers)
    assert result.state_after == NettingState().plus(result.credits)
    assert_invariants(items, programs, vouchers, result, result.state_after)


@given(scenario(), st.randoms(use_true_random=False))
def test_netting_ignores_input_order(
    case: tuple[list[ChargeItem], list[Program], list[Voucher]], rnd: random.Random
) -> None:
    items, programs, vouchers = list(case[0]), list(case[1]), list(case[2])
    expected = net_items(items, programs, vouchers)
    for seq in (items, programs, vouchers):
        rnd.shuffle(seq)
    assert net_items(items, programs, vouchers) == expected


@settings(max_examples=300)
@given(scenario())
def test_netting_split_over_two_settlements_keeps_invariants(
    case: tuple[list[ChargeItem], list[Program], list[Voucher]],
) -> None:
    items, programs, vouchers = case
    first = net_items([i for i in items if i.day.year == 2025], programs, vouchers)
    known = [*vouchers, *first.auto_granted]
    second = net_items([i for i in items if i.day.year == 2026], programs, known, first.state_after)
    assert not {v.voucher_id for v in second.auto_granted} & {v.voucher_id for v in known}
    combined = NettingResult(
        first.credits + second.credits, first.auto_granted + second.auto_granted, (), second.state_after
    )
    assert_invariants(items, programs, vouchers, combined, second.state_after)
    assert second.state_after == NettingState().plus(combined.credits)
    if all(p.auto_grant is None for p in programs):
        # without auto-grants (which happen at first sight) carrying state is exact
        assert combined.credits == net_items(items, programs, vouchers).credits
