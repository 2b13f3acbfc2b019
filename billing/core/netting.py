"""Voucher netting (docs/billing-rules.md section 3: order 3.7-3.9, credit 3.10, grants 3.4-3.6) as one pure function.

Facts in (items, programs, vouchers, what earlier settlements drew), a result out:
the credits, the vouchers auto-granted by this settlement, a trail with one step per
voucher tried on an item, and the drawn totals to carry into the next settlement.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from itertools import pairwise
from operator import itemgetter

from billing.core.model import (
    AUTO_GRANT_PRIORITY,
    COMPUTE,
    ChargeItem,
    Credit,
    InvalidBillingDataError,
    ItemKey,
    Program,
    Voucher,
)
from billing.core.money import ZERO, MoneyFormatError, exact_decimal, from_cents, subsidy_cents, to_cents

FirmProgram = tuple[str, str]  # (firm_id, program_id)


@dataclass(frozen=True, slots=True)
class NettingState:
    """Credits already drawn by earlier settlements (all > 0 entries, money Decimals)."""

    drawn_by_voucher: Mapping[str, Decimal] = field(default_factory=dict)
    drawn_by_firm_program: Mapping[FirmProgram, Decimal] = field(default_factory=dict)
    drawn_by_program: Mapping[str, Decimal] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("drawn_by_voucher", "drawn_by_firm_program", "drawn_by_program"):
            for key, amount in getattr(self, name).items():
                if not isinstance(amount, Decimal) or not amount.is_finite() or amount < 0:
                    raise InvalidBillingDataError(f"{name}[{key!r}] must be a Decimal >= 0")
                try:
                    to_cents(amount)
                except MoneyFormatError:
                    raise InvalidBillingDataError(f"{name}[{key!r}] must be whole fen, got {amount}") from None

    @exact_decimal
    def plus(self, credits: Iterable[Credit]) -> NettingState:
        """This state with ``credits`` drawn as well."""
        by_voucher: dict[str, Decimal] = dict(self.drawn_by_voucher)
        by_firm_program: dict[FirmProgram, Decimal] = dict(self.drawn_by_firm_program)
        by_program: dict[str, Decimal] = dict(self.drawn_by_program)
        for credit in credits:
            fp = (credit.firm_id, credit.program_id)
            by_voucher[credit.voucher_id] = by_voucher.get(credit.voucher_id, ZERO) + credit.amount
            by_firm_program[fp] = by_firm_program.get(fp, ZERO) + credit.amount
            by_program[credit.program_id] = by_program.get(credit.program_id, ZERO) + credit.amount
        return NettingState(
            dict(sorted(by_voucher.items())),
            dict(sorted(by_firm_program.items())),
            dict(sorted(by_program.items())),
        )


@dataclass(frozen=True, slots=True)
class NettingStep:
    """Why a voucher tried on an item gave what it gave.

    credit = min(subsidy, voucher_balance, firm_cap_left, program_budget_left);
    ``limited_by`` names the first term equal to the minimum, in that order.
    A step with credit 0 records a voucher that was eligible but could give nothing.
    """

    item: ItemKey
    voucher_id: str
    program_id: str
    uncovered_before: Decimal
    subsidy_rate: Decimal
    subsidy: Decimal  # round_half_up(subsidy_rate x uncovered_before)
    voucher_balance: Decimal
    firm_cap_left: Decimal
    program_budget_left: Decimal
    credit: Decimal
    limited_by: str  # "subsidy" | "voucher_balance" | "firm_cap" | "program_budget"


@dataclass(frozen=True, slots=True)
class NettingResult:
    credits: tuple[Credit, ...]  # in netting order
    auto_granted: tuple[Voucher, ...]  # sorted by voucher_id; persist them with the credits
    trail: tuple[NettingStep, ...]
    state_after: NettingState


def auto_grant_id(program_id: str, firm_id: str) -> str:
    return f"AUTO-{program_id}-{firm_id}"


def _index_programs(programs: Iterable[Program]) -> dict[str, Program]:
    by_id: dict[str, Program] = {}
    for program in programs:
        if program.program_id in by_id and by_id[program.program_id] != program:
            raise InvalidBillingDataError(f"two different programs with id {program.program_id}")
        by_id[program.program_id] = program
    return by_id


def _index_vouchers(vouchers: Iterable[Voucher], programs: Mapping[str, Program]) -> dict[str, Voucher]:
    by_id: dict[str, Voucher] = {}
    for voucher in vouchers:
        if voucher.voucher_id in by_id and by_id[voucher.voucher_id] != voucher:
            raise InvalidBillingDataError(f"two different vouchers with id {voucher.voucher_id}")
        if voucher.program_id not in programs:
            raise InvalidBillingDataError(f"voucher {voucher.voucher_id} names unknown program {voucher.program_id}")
        by_id[voucher.voucher_id] = voucher
    return by_id


def _check_items(items: Iterable[ChargeItem]) -> list[ChargeItem]:
    keyed = sorted(((i.netting_order, i) for i in items), key=itemgetter(0))
    for (before, _), (after, item) in pairwise(keyed):
        if before == after:
            raise InvalidBillingDataError(f"two charge items share the key {item.key}")
    return [item for _, item in keyed]


def grant_automatic_vouchers(
    items: Iterable[ChargeItem], programs: Mapping[str, Program], vouchers: Mapping[str, Voucher]
) -> list[Voucher]:
    """Vouchers this settlement must auto-grant, sorted by voucher_id.

    For each *compute* program with ``auto_grant``: every firm with an item of
    allocated_seconds > 0 dated in the program year, holding no voucher of that program
    (whatever its validity or balance), gets AUTO-<program_id>-<firm_id>, valid
    Jan 1 .. Dec 31 of the program year, priority 1000.
    """
    holders = {(v.program_id, v.firm_id) for v in vouchers.values()}
    firms_by_year: dict[int, set[str]] = defaultdict(set)
    for item in items:
        if item.allocated_seconds > 0:
            firms_by_year[item.day.year].add(item.firm_id)
    granted: list[Voucher] = []
    for program in programs.values():
        grant = program.auto_grant
        if grant is None or program.category != COMPUTE:
            continue
        for firm_id in firms_by_year.get(program.year, set()):
            if (program.program_id, firm_id) in holders:
                continue
            voucher_id = auto_grant_id(program.program_id, firm_id)
            if voucher_id in vouchers:
                raise InvalidBillingDataError(f"voucher id {voucher_id} is taken by another program or firm")
            granted.append(
                Voucher(
                    voucher_id=voucher_id,
                    program_id=program.program_id,
                    firm_id=firm_id,
                    face_value=grant.face_value,
                    subsidy_rate=grant.subsidy_rate,
                    valid_from=date(program.year, 1, 1),
                    valid_until=date(program.year, 12, 31),
                    priority=AUTO_GRANT_PRIORITY,
                )
            )
    return sorted(granted, key=lambda v: v.voucher_id)


@exact_decimal
def net_items(
    items: Iterable[ChargeItem],
    programs: Iterable[Program],
    vouchers: Iterable[Voucher],
    state: NettingState | None = None,
    *,
    explain: bool = True,
) -> NettingResult:
    """Apply voucher credits to ``items`` (one settlement), starting from ``state``.

    ``explain=False`` skips building the trail (same credits; for large settlements
    that do not keep it).

    ``vouchers`` must hold every voucher ever issued, including earlier auto-grants,
    in any state: holding one decides whether an auto-grant is due.
    """
    if state is None:
        state = NettingState()
    program_by_id = _index_programs(programs)
    voucher_by_id = _index_vouchers(vouchers, program_by_id)
    unknown = sorted(set(state.drawn_by_voucher) - set(voucher_by_id))
    if unknown:
        raise InvalidBillingDataError(
            f"carried state draws from vouchers not given (earlier auto-grants?): {', '.join(unknown)}"
        )
    ordered_items = _check_items(items)
    granted = grant_automatic_vouchers(ordered_items, program_by_id, voucher_by_id)

    # each firm's vouchers in try order, with their programs; only compute programs net GPU usage
    every_voucher = [*voucher_by_id.values(), *granted]
    vouchers_by_firm: dict[str, list[tuple[Voucher, Program]]] = defaultdict(list)
    for voucher in sorted(every_voucher, key=lambda v: v.try_order):
        program = program_by_id[voucher.program_id]
        if program.category == COMPUTE:
            vouchers_by_firm[voucher.firm_id].append((voucher, program))

    # The loop counts whole fen in ints: every amount involved is money (at most two places),
    # and subsidy_cents rounds half-up exactly (a property test checks it against Fractions).
    rate_of = {v.voucher_id: v.subsidy_rate.as_integer_ratio() for v in every_voucher}
    face = {v.voucher_id: to_cents(v.face_value) for v in every_voucher}
    cap = {p.program_id: to_cents(p.firm_cap) for p in program_by_id.values()}
    budget = {p.program_id: to_cents(p.budget) for p in program_by_id.values()}
    drawn_v = {k: to_cents(v) for k, v in state.drawn_by_voucher.items()}
    drawn_fp = {k: to_cents(v) for k, v in state.drawn_by_firm_program.items()}
    drawn_p = {k: to_cents(v) for k, v in state.drawn_by_program.items()}
    credits: list[Credit] = []
    trail: list[NettingStep] = []

    for item in ordered_items:
        vouchers_of_firm = vouchers_by_firm.get(item.firm_id)
        if not vouchers_of_firm:
            continue
        key = item.key
        day = item.day
        uncovered = to_cents(item.amount)
        for voucher, program in vouchers_of_firm:
            if program.year != day.year or not voucher.valid_from <= day <= voucher.valid_until:
                continue
            vid, pid = voucher.voucher_id, voucher.program_id
            balance = max(face[vid] - drawn_v.get(vid, 0), 0)
            if balance <= 0:
                continue
            fp = (item.firm_id, pid)
            subsidy = subsidy_cents(rate_of[vid], uncovered)
            cap_left = max(cap[pid] - drawn_fp.get(fp, 0), 0)
            budget_left = max(budget[pid] - drawn_p.get(pid, 0), 0)
            credit = min(subsidy, balance, cap_left, budget_left)
            if explain:
                terms = {"subsidy": subsidy, "voucher_balance": balance, "firm_cap": cap_left,
                         "program_budget": budget_left}  # fmt: skip
                trail.append(
                    NettingStep(
                        item=key,
                        voucher_id=vid,
                        program_id=pid,
                        uncovered_before=from_cents(uncovered),
                        subsidy_rate=voucher.subsidy_rate,
                        subsidy=from_cents(subsidy),
                        voucher_balance=from_cents(balance),
                        firm_cap_left=from_cents(cap_left),
                        program_budget_left=from_cents(budget_left),
                        credit=from_cents(credit),
                        limited_by=next(name for name, value in terms.items() if value == credit),
                    )
                )
            if credit <= 0:
                continue
            credits.append(Credit.drawn(key, vid, pid, from_cents(credit)))
            uncovered -= credit
            drawn_v[vid] = drawn_v.get(vid, 0) + credit
            drawn_fp[fp] = drawn_fp.get(fp, 0) + credit
            drawn_p[pid] = drawn_p.get(pid, 0) + credit

    state_after = NettingState(
        {k: from_cents(v) for k, v in sorted(drawn_v.items())},
        {k: from_cents(v) for k, v in sorted(drawn_fp.items())},
        {k: from_cents(v) for k, v in sorted(drawn_p.items())},
    )
    return NettingResult(
        credits=tuple(credits),
        auto_granted=tuple(granted),
        trail=tuple(trail),
        state_after=state_after,
    )
