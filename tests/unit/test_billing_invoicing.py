"""Invoices (docs/billing-rules.md section 4) and their JSON export (4.7)."""

from __future__ import annotations

import json
import random
from datetime import date
from decimal import ROUND_DOWN, Decimal, localcontext
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.core.invoicing import Invoice, build_invoices, export_document, to_export_dict
from billing.core.model import (
    AutoGrant,
    ChargeItem,
    Credit,
    Firm,
    InvalidBillingDataError,
    ItemKey,
    Program,
    Rate,
    UsageAggregate,
    Voucher,
)
from billing.core.netting import net_items
from billing.core.pricing import price_items

D = Decimal
JAN1 = date(2025, 1, 1)


def usage(
    firm: str, day: date, seconds: int, provider: str = "P1", adjustment_for: str | None = None
) -> UsageAggregate:
    return UsageAggregate(firm, day, provider, "A100", seconds, 1, adjustment_for=adjustment_for)


def one_invoice(invoices: tuple[Invoice, ...]) -> Invoice:
    assert len(invoices) == 1
    return invoices[0]


def test_rate_change_mid_month_gives_one_line_per_price() -> None:
    # 10.00/h until 03-15, 12.00/h from 03-16. F1: 0.5 h on 03-01, 1 h on 03-15, 1 h on 03-16.
    # line 10.00: 1.5 h, 5.00 + 10.00 = 15.00; line 12.00: 1 h, 12.00. gross 27.00.
    rates = [Rate("A100", "*", D("10.00"), JAN1), Rate("A100", "*", D("12.00"), date(2025, 3, 16))]
    items = price_items(
        [
            usage("F1", date(2025, 3, 16), 3600),
            usage("F1", date(2025, 3, 1), 1800),
            usage("F1", date(2025, 3, 15), 3600),
        ],
        rates,
    )
    invoice = one_invoice(build_invoices("2025-03", items, [], []))
    assert [(ln.unit_price, ln.gpu_hours, ln.amount) for ln in invoice.lines] == [
        (D("10.00"), Fraction(3, 2), D("15.00")),
        (D("12.00"), Fraction(1), D("12.00")),
    ]
    assert (invoice.gross, invoice.credit_total, invoice.amount_due) == (D("27.00"), D("0.00"), D("27.00"))


def test_line_amount_is_the_sum_of_item_amounts_not_re_rounded() -> None:
    # Two days of 18 s at 1.00/h: each item 0.005 -> 0.01. The line is 0.02 although its
    # exact hours (0.01 h) x 1.00 would round to 0.01: items are what is billed.
    items = price_items(
        [usage("F1", date(2025, 3, 1), 18), usage("F1", date(2025, 3, 2), 18)],
        [Rate("A100", "*", D("1.00"), JAN1)],
    )
    invoice = one_invoice(build_invoices("2025-03", items, [], []))
    assert [(ln.gpu_hours, ln.amount) for ln in invoice.lines] == [(Fraction(1, 100), D("0.02"))]
    assert to_export_dict(invoice)["lines"][0]["gpu_hours"] == "0.010000"


def test_adjustment_lines_follow_own_lines_by_month() -> None:
    rates = [Rate("A100", "*", D("10.00"), JAN1)]
    items = price_items(
        [
            usage("F1", date(2025, 2, 27), 3600, adjustment_for="2025-02"),
            usage("F1", date(2025, 3, 2), 3600),
            usage("F1", date(2025, 1, 31), 7200, adjustment_for="2025-01"),
            usage("F1", date(2025, 2, 28), 3600, adjustment_for="2025-02"),
            usage("F1", date(2025, 3, 1), 3600, provider="P0"),
        ],
        rates,
    )
    lines = one_invoice(build_invoices("2025-03", items, [], [])).lines
    assert [(ln.adjustment_for, ln.provider_id, ln.amount) for ln in lines] == [
        (None, "P0", D("10.00")),
        (None, "P1", D("10.00")),
        ("2025-01", "P1", D("20.00")),
        ("2025-02", "P1", D("20.00")),
    ]


def test_credits_one_per_voucher_and_totals() -> None:
    # F1 uses 100.00 on 03-01 and 03-02; V1 (30%) and V2 (20%) -> per item 30.00 + 14.00.
    items = price_items(
        [usage("F1", date(2025, 3, 1), 36000), usage("F1", date(2025, 3, 2), 36000)],
        [Rate("A100", "*", D("10.00"), JAN1)],
    )
    program = Program("SH25", 2025, "compute", D("1000.00"), D("1000.00"))
    vouchers = [
        Voucher("V2", "SH25", "F1", D("500.00"), D("0.2"), JAN1, date(2025, 12, 31), 2),
        Voucher("V1", "SH25", "F1", D("500.00"), D("0.3"), JAN1, date(2025, 12, 31), 1),
    ]
    credits = net_items(items, [program], vouchers).credits
    invoice = one_invoice(build_invoices("2025-03", items, credits, []))
    assert [(c.voucher_id, c.amount) for c in invoice.credits] == [("V1", D("60.00")), ("V2", D("28.00"))]
    assert (invoice.gross, invoice.credit_total, invoice.amount_due) == (
        D("200.00"),
        D("88.00"),
        D("112.00"),
    )


@pytest.mark.parametrize(
    ("month", "firms", "issue", "due"),
    [
        ("2025-03", [Firm("F1", "Acme", 45)], date(2025, 4, 1), date(2025, 5, 16)),
        ("2025-12", [], date(2026, 1, 1), date(2026, 1, 31)),
        ("2024-01", [Firm("F1", "Acme")], date(2024, 2, 1), date(2024, 3, 2)),
        ("2025-01", [Firm("F1", "Acme", 0)], date(2025, 2, 1), date(2025, 2, 1)),
    ],
    ids=["firm-terms-45", "unknown-firm-30-across-year-end", "leap-february", "due-on-issue"],
)
def test_issue_and_due_dates(month: str, firms: list[Firm], issue: date, due: date) -> None:
    year, month_number = (int(x) for x in month.split("-"))
    items = price_items([usage("F1", date(year, month_number, 5), 60)], [Rate("A100", "*", D("1"), date(2000, 1, 1))])
    invoice = one_invoice(build_invoices(month, items, [], firms))
    assert (invoice.invoice_id, invoice.issue_date, invoice.due_date) == (f"INV-{month}-F1", issue, due)


def test_export_shape_exactly() -> None:
    items = price_items(
        [usage("F2", date(2025, 3, 1), 1), usage("F1", date(2025, 2, 3), 5400, adjustment_for="2025-02")],
        [Rate("A100", "*", D("8.5"), JAN1)],
    )
    program = Program("SH25", 2025, "compute", D("100.00"), D("100.00"), AutoGrant(D("5.00"), D("0.5")))
    credits = net_items(items, [program], []).credits
    document = export_document("2025-03", reversed(build_invoices("2025-03", items, credits, [])))
    assert json.loads(json.dumps(document)) == {
        "month": "2025-03",
        "invoices": [
            {
                "invoice_id": "INV-2025-03-F1",
                "firm_id": "F1",
                "month": "2025-03",
                "issue_date": "2025-04-01",
                "due_date": "2025-05-01",
                "currency": "CNY",
                "lines": [
                    # 1.5 h x 8.5 = 12.75; 50% = 6.375 -> 6.38, capped by the 5.00 face value
                    {
                        "provider_id": "P1",
                        "gpu_class": "A100",
                        "unit_price": "8.5",
                        "gpu_hours": "1.500000",
                        "amount": "12.75",
                        "adjustment_for": "2025-02",
                    },
                ],
                "credits": [{"voucher_id": "AUTO-SH25-F1", "program_id": "SH25", "amount": "5.00"}],
                "gross": "12.75",
                "credit_total": "5.00",
                "amount_due": "7.75",
            },
            {
                "invoice_id": "INV-2025-03-F2",
                "firm_id": "F2",
                "month": "2025-03",
                "issue_date": "2025-04-01",
                "due_date": "2025-05-01",
                "currency": "CNY",
                "lines": [
                    # 1 s = 0.000277.. h -> shown 0.000278; amount 0.0023.. -> 0.00
                    {
                        "provider_id": "P1",
                        "gpu_class": "A100",
                        "unit_price": "8.5",
                        "gpu_hours": "0.000278",
                        "amount": "0.00",
                        "adjustment_for": None,
                    },
                ],
                "credits": [],
                "gross": "0.00",
                "credit_total": "0.00",
                "amount_due": "0.00",
            },
        ],
    }


@pytest.mark.parametrize(
    ("items", "credits", "match"),
    [
        (
            [ChargeItem("F1", date(2025, 2, 1), "P1", "A100", 3600, D("1"), D("1.00"), 1)],
            [],
            "not marked as an adjustment",
        ),
        (
            [
                ChargeItem(
                    "F1",
                    date(2025, 3, 1),
                    "P1",
                    "A100",
                    3600,
                    D("1"),
                    D("1.00"),
                    1,
                    adjustment_for="2025-03",
                )
            ],
            [],
            "month before",
        ),
        (
            [],
            [Credit(ItemKey(date(2025, 3, 1), "F1", "P1", "A100"), "V1", "SH", "F1", D("1.00"))],
            "unknown item",
        ),
        (
            [ChargeItem("F1", date(2025, 3, 1), "P1", "A100", 3600, D("1"), D("1.00"), 1)],
            [
                Credit(ItemKey(date(2025, 3, 1), "F1", "P1", "A100"), "V1", "SH", "F1", D("0.60")),
                Credit(ItemKey(date(2025, 3, 1), "F1", "P1", "A100"), "V2", "SH", "F1", D("0.41")),
            ],
            "exceed",
        ),
    ],
    ids=["other-month-unmarked", "adjustment-of-current-month", "credit-without-item", "over-credited"],
)
def test_invoices_refuse_inconsistent_inputs(items: list[ChargeItem], credits: list[Credit], match: str) -> None:
    with pytest.raises(InvalidBillingDataError, match=match):
        build_invoices("2025-03", items, credits, [])


def test_month_must_be_well_formed() -> None:
    with pytest.raises(InvalidBillingDataError, match="YYYY-MM"):
        build_invoices("2025-13", [], [], [])


# ----------------------------------------------------------------- properties

RATES = [Rate("A100", "*", D("9.99"), JAN1), Rate("A100", "P2", D("3.3333"), date(2025, 3, 10))]
PROGRAMS = [
    Program("SH25", 2025, "compute", D("120.00"), D("70.00"), AutoGrant(D("50.00"), D("0.3"))),
    Program("SZ25", 2025, "compute", D("40.00"), D("40.00")),
]
VOUCHERS = [Voucher("SZ-1", "SZ25", "F2", D("40.00"), D("0.75"), JAN1, date(2025, 3, 15), 1)]
aggregates = st.lists(
    st.builds(
        UsageAggregate,
        firm_id=st.sampled_from(["F1", "F2", "F3"]),
        day=st.dates(date(2025, 3, 1), date(2025, 3, 31)),
        provider_id=st.sampled_from(["P1", "P2"]),
        gpu_class=st.just("A100"),
        allocated_seconds=st.integers(0, 20 * 3600),
        record_count=st.integers(1, 3),
    ),
    max_size=20,
)


def settle(usages: list[UsageAggregate]) -> tuple[list[ChargeItem], list[Credit], tuple[Invoice, ...]]:
    items = price_items(usages, RATES)
    credits = list(net_items(items, PROGRAMS, VOUCHERS).credits)
    return items, credits, build_invoices("2025-03", items, credits, [Firm("F2", "Two", 15)])


@given(aggregates)
def test_invoice_totals_conserve_money(usages: list[UsageAggregate]) -> None:
    items, credits, invoices = settle(usages)
    for invoice in invoices:
        assert invoice.gross == invoice.credit_total + invoice.amount_due
        assert invoice.amount_due >= 0
        assert invoice.gross == sum((ln.amount for ln in invoice.lines), D(0))
        exported = to_export_dict(invoice)
        assert D(exported["gross"]) == D(exported["credit_total"]) + D(exported["amount_due"])
    assert sum((inv.gross for inv in invoices), D(0)) == sum((i.amount for i in items), D(0))
    assert sum((inv.credit_total for inv in invoices), D(0)) == sum((c.amount for c in credits), D(0))
    assert sorted(inv.firm_id for inv in invoices) == sorted({i.firm_id for i in items})


@given(aggregates, st.randoms(use_true_random=False))
def test_invoices_ignore_input_order(usages: list[UsageAggregate], rnd: random.Random) -> None:
    items, credits, invoices = settle(usages)
    rnd.shuffle(items)
    rnd.shuffle(credits)
    assert build_invoices("2025-03", items, credits, [Firm("F2", "Two", 15)]) == invoices
    assert export_document("2025-03", invoices) == export_document("2025-03", reversed(invoices))


def test_results_do_not_depend_on_the_callers_decimal_context() -> None:
    # 1000 h x 9.99 = 9990.00 per item; a 3-digit, round-down caller context would turn
    # the sums into 2.00E+4 if any billing arithmetic ran in it.
    usages = [UsageAggregate("F1", date(2025, 3, day), "P1", "A100", 1000 * 3600, 1) for day in (1, 2, 3)]
    expected = settle(usages)
    assert expected[2][0].gross == D("29970.00")
    with localcontext() as ctx:
        ctx.prec = 3
        ctx.rounding = ROUND_DOWN
        assert settle(usages) == expected


def test_voucher_limits_say_which_limit_held_a_voucher_back() -> None:
    from datetime import date
    from decimal import Decimal

    from billing.core.statement import voucher_limits

    march = (date(2026, 3, 1), date(2026, 3, 31))
    d = Decimal
    assert voucher_limits("P", (date(2026, 1, 1), date(2026, 12, 31)), march, d("10"), d("50"), d("99"),
                          d("3"), d("3"), d("3")) == ()  # fmt: skip
    assert voucher_limits("P", (date(2026, 3, 10), date(2026, 3, 20)), march, d("10"), d("50"), d("99"),
                          d("10"), d("50"), d("99")) == (
        "voucher used up (face value 10.00)", "firm cap of P reached (50.00 per firm)",
        "budget of P exhausted (99.00)", "valid only from 2026-03-10", "expired after 2026-03-20",
    )  # fmt: skip


def test_daily_hours_add_up_to_their_lines_hours_to_the_last_place() -> None:
    """Three items of 1 s are 0.000278 GPU-h each when rounded alone (0.000834 together) while
    their line says 0.000833: the daily rows are rounded so they add up to the line exactly."""
    from datetime import date
    from decimal import Decimal
    from fractions import Fraction

    from billing.core.invoicing import Invoice, InvoiceLine
    from billing.core.statement import DayUsage, FirmStatement, check_statement, hours_by_item

    price = Decimal("10.00")
    line = InvoiceLine("P1", "H100", price, Fraction(3, 3600), Decimal("0.00"), None, 3, 3, 0, 0, 3)
    other = InvoiceLine("P2", "H100", price, Fraction(7200, 3600), Decimal("20.00"), None, 7200, 1, 0, 0, 1)
    inv = Invoice("INV-2026-03-F1", "F1", "2026-03", date(2026, 4, 1), date(2026, 5, 1), "CNY", (line, other), (),
                  Decimal("20.00"), Decimal("0.00"), Decimal("20.00"))  # fmt: skip
    daily = tuple(DayUsage(date(2026, 3, d), "P1", "H100", price, None, 1, 0, 0) for d in (1, 2, 3))
    daily += (DayUsage(date(2026, 3, 2), "P2", "H100", price, None, 7200, 0, 0),)
    st = FirmStatement("F1", "F1", "2026-03", inv, None, date(2026, 4, 1), daily, ((date(2026, 3, 1), date(2026, 3, 3)),
                       (date(2026, 3, 2), date(2026, 3, 2))))  # fmt: skip
    check_statement(st)
    hours = hours_by_item(st)
    assert sum(hours[:3]) == Fraction(833, 10**6) and sorted(hours[:3]) == [Fraction(n, 10**6) for n in (277, 278, 278)]
    assert hours[3] == 2
