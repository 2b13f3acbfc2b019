"""Plain data of the settlement core: frozen dataclasses, error classes, month helpers.

Every money field is a ``Decimal`` with at most two places; prices and subsidy rates
are ``Decimal`` of any precision; hours are exact ``Fraction`` values. Objects validate
themselves on construction, so a bad value is refused at the edge, not in the middle
of a settlement. The one exception: items and credits the core computes itself from
checked inputs (``ChargeItem.priced``, ``Credit.drawn``) skip re-checking.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from fractions import Fraction
from typing import NamedTuple

from billing.core.fastpath import CheckedTexts, unchecked_builder
from gpumeter.errors import GpumeterError
from gpumeter.record import UNATTRIBUTED as UNATTRIBUTED  # usage no firm could be named for: never invoiced

ANY_PROVIDER = "*"
COMPUTE = "compute"
CATEGORIES = frozenset({"compute", "model", "data"})
AUTO_GRANT_PRIORITY = 1000
DEFAULT_PAYMENT_TERMS_DAYS = 30
_MONTH_RE = re.compile(r"\A(\d{4})-(0[1-9]|1[0-2])\Z")


class BillingError(GpumeterError):
    """Base of every error the billing core raises; ``code`` is stable for callers."""

    code = "billing_error"


class InvalidBillingDataError(BillingError, ValueError):
    """A value or a combination of inputs breaks a rule of the billing core."""

    code = "invalid_billing_data"


def _fail(message: str) -> InvalidBillingDataError:
    return InvalidBillingDataError(message)


# ----------------------------------------------------------------- months


def parse_month(month: str) -> tuple[int, int]:
    """``"YYYY-MM"`` -> (year, month); anything else is refused."""
    match = _MONTH_RE.match(month) if isinstance(month, str) else None
    if match is None:
        raise _fail(f"month must be 'YYYY-MM', got {month!r}")
    return int(match.group(1)), int(match.group(2))


@functools.lru_cache(maxsize=4096)
def month_of(day: date) -> str:
    """The ``"YYYY-MM"`` calendar month containing ``day`` (cached: a settlement asks per item)."""
    return f"{day.year:04d}-{day.month:02d}"


def first_day_of_month(month: str) -> date:
    year, month_number = parse_month(month)
    return date(year, month_number, 1)


def first_day_of_next_month(month: str) -> date:
    year, month_number = parse_month(month)
    return date(year + 1, 1, 1) if month_number == 12 else date(year, month_number + 1, 1)


# ----------------------------------------------------------------- checks


def check_text(value: object, name: str) -> None:
    """The plain rule for ids and names: a non-empty string without surrounding spaces."""
    if not isinstance(value, str) or not value or value != value.strip():
        raise _fail(f"{name} must be a non-empty string without surrounding spaces, got {value!r}")


_check_text = CheckedTexts(check_text).verify  # fastpath: a settlement checks the same ids per item


def _check_decimal(value: object, name: str) -> Decimal:
    if not isinstance(value, Decimal) or not value.is_finite():
        raise _fail(f"{name} must be a finite Decimal, got {value!r}")
    return value


def is_whole_cents(amount: Decimal) -> bool:
    """True when ``amount`` has no digit below the fen (checked exactly, context-free)."""
    numerator, denominator = amount.as_integer_ratio()
    return (numerator * 100) % denominator == 0


def _check_money(value: object, name: str) -> None:
    amount = _check_decimal(value, name)
    if amount < 0 or not is_whole_cents(amount):
        raise _fail(f"{name} must be >= 0 with at most 2 decimal places, got {value!r}")


def _check_subsidy_rate(value: object, name: str) -> None:
    rate = _check_decimal(value, name)
    if not Decimal(0) < rate <= Decimal(1):
        raise _fail(f"{name} must satisfy 0 < rate <= 1, got {value!r}")


def _check_count(value: object, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _fail(f"{name} must be an int >= 0, got {value!r}")


def _check_day(value: object, name: str) -> None:
    if not isinstance(value, date):
        raise _fail(f"{name} must be a date, got {value!r}")


# ----------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class Rate:
    """One rate-card row: price per GPU-hour of ``gpu_class`` from ``effective_from`` on."""

    gpu_class: str
    provider: str  # a provider id, or ANY_PROVIDER ("*")
    price_per_gpu_hour: Decimal
    effective_from: date

    def __post_init__(self) -> None:
        _check_text(self.gpu_class, "gpu_class")
        _check_text(self.provider, "provider")
        price = _check_decimal(self.price_per_gpu_hour, "price_per_gpu_hour")
        if price < 0:
            raise _fail(f"price_per_gpu_hour must be >= 0, got {price!r}")
        _check_day(self.effective_from, "effective_from")


@dataclass(frozen=True, slots=True)
class AutoGrant:
    face_value: Decimal
    subsidy_rate: Decimal

    def __post_init__(self) -> None:
        _check_money(self.face_value, "auto_grant.face_value")
        _check_subsidy_rate(self.subsidy_rate, "auto_grant.subsidy_rate")


@dataclass(frozen=True, slots=True)
class Program:
    """A yearly voucher pool: ``budget`` for everyone, ``firm_cap`` per firm."""

    program_id: str
    year: int
    category: str  # one of CATEGORIES; only COMPUTE nets GPU usage
    budget: Decimal
    firm_cap: Decimal
    auto_grant: AutoGrant | None = None

    def __post_init__(self) -> None:
        _check_text(self.program_id, "program_id")
        if not isinstance(self.year, int) or not 1 <= self.year <= 9999:
            raise _fail(f"program {self.program_id}: year must be an int year, got {self.year!r}")
        if self.category not in CATEGORIES:
            raise _fail(
                f"program {self.program_id}: category must be one of {sorted(CATEGORIES)}, got {self.category!r}"
            )
        _check_money(self.budget, "budget")
        _check_money(self.firm_cap, "firm_cap")


@dataclass(frozen=True, slots=True)
class Voucher:
    voucher_id: str
    program_id: str
    firm_id: str
    face_value: Decimal
    subsidy_rate: Decimal  # share of an item's uncovered amount it may pay
    valid_from: date  # inclusive
    valid_until: date  # inclusive
    priority: int  # lower is tried first

    def __post_init__(self) -> None:
        _check_text(self.voucher_id, "voucher_id")
        _check_text(self.program_id, "program_id")
        _check_text(self.firm_id, "firm_id")
        _check_money(self.face_value, "face_value")
        _check_subsidy_rate(self.subsidy_rate, "subsidy_rate")
        _check_day(self.valid_from, "valid_from")
        _check_day(self.valid_until, "valid_until")
        if self.valid_from > self.valid_until:
            raise _fail(f"voucher {self.voucher_id}: valid_from is after valid_until")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise _fail(f"voucher {self.voucher_id}: priority must be an int")

    @property
    def try_order(self) -> tuple[int, date, str]:
        """Total order in which a firm's vouchers are tried on an item."""
        return (self.priority, self.valid_until, self.voucher_id)


@dataclass(frozen=True, slots=True)
class Firm:
    firm_id: str
    name: str
    payment_terms_days: int = DEFAULT_PAYMENT_TERMS_DAYS

    def __post_init__(self) -> None:
        _check_text(self.firm_id, "firm_id")
        _check_count(self.payment_terms_days, "payment_terms_days")


# ----------------------------------------------------------------- usage and items


def _check_usage_key(firm_id: str, day: date, provider_id: str, gpu_class: str, adjustment_for: str | None) -> None:
    _check_text(firm_id, "firm_id")
    _check_day(day, "day")
    _check_text(provider_id, "provider_id")
    if provider_id == ANY_PROVIDER:
        raise _fail("provider_id '*' is reserved for the rate card")
    _check_text(gpu_class, "gpu_class")
    if adjustment_for is not None:
        parse_month(adjustment_for)
        if adjustment_for != month_of(day):
            raise _fail(f"adjustment_for {adjustment_for} must be the month of the item's day {day}")


@dataclass(frozen=True, slots=True)
class UsageAggregate:
    """Deduplicated usage of one firm on one billing-time-zone day, provider and class.

    ``adjustment_for`` is ``"YYYY-MM"`` when the usage belongs to an already closed
    month (late usage, settled with a later month), else ``None``.
    """

    firm_id: str
    day: date
    provider_id: str
    gpu_class: str
    allocated_seconds: int
    record_count: int
    busy_seconds: int = 0
    energy_joules: int = 0
    adjustment_for: str | None = None

    def __post_init__(self) -> None:
        _check_usage_key(self.firm_id, self.day, self.provider_id, self.gpu_class, self.adjustment_for)
        a, r, b, e = self.allocated_seconds, self.record_count, self.busy_seconds, self.energy_joules
        if not (type(a) is int and type(r) is int and type(b) is int and type(e) is int and min(a, r, b, e) >= 0):
            for name in ("allocated_seconds", "record_count", "busy_seconds", "energy_joules"):  # says which
                _check_count(getattr(self, name), name)


class ItemKey(NamedTuple):
    """Identity of a charge item within one settlement (a tuple: cheap to hash, as dict keys need)."""

    day: date
    firm_id: str
    provider_id: str
    gpu_class: str
    adjustment_for: str | None = None

    @property
    def netting_order(self) -> tuple[date, str, str, str, str]:
        """(day, firm_id, provider_id, gpu_class, adjustment_for) - a total order."""
        return (self.day, self.firm_id, self.provider_id, self.gpu_class, self.adjustment_for or "")


@dataclass(frozen=True, slots=True)
class ChargeItem:
    """One priced item: ``amount`` = round_half_up(gpu_hours x unit_price), exact hours."""

    firm_id: str
    day: date
    provider_id: str
    gpu_class: str
    allocated_seconds: int
    unit_price: Decimal  # per GPU-hour
    amount: Decimal
    record_count: int
    busy_seconds: int = 0
    energy_joules: int = 0
    adjustment_for: str | None = None
    key: ItemKey = field(init=False, repr=False, compare=False)  # kept: netting and invoicing look it up

    def __post_init__(self) -> None:
        _check_usage_key(self.firm_id, self.day, self.provider_id, self.gpu_class, self.adjustment_for)
        object.__setattr__(
            self, "key", ItemKey(self.day, self.firm_id, self.provider_id, self.gpu_class, self.adjustment_for)
        )
        _check_count(self.allocated_seconds, "allocated_seconds")
        if _check_decimal(self.unit_price, "unit_price") < 0:
            raise _fail("unit_price must be >= 0")
        _check_money(self.amount, "amount")

    @classmethod
    def priced(
        cls,
        usage: UsageAggregate,
        allocated_seconds: int,
        record_count: int,
        busy_seconds: int,
        energy_joules: int,
        unit_price: Decimal,
        amount: Decimal,
    ) -> ChargeItem:
        """The item pricing computed for checked usage (key and counts of a UsageAggregate, a Rate's
        price, an amount rounded to the fen): the checks already held, so they are not run again."""
        return _build_charge_item(
            usage.firm_id,
            usage.day,
            usage.provider_id,
            usage.gpu_class,
            allocated_seconds,
            unit_price,
            amount,
            record_count,
            busy_seconds,
            energy_joules,
            usage.adjustment_for,
            ItemKey(usage.day, usage.firm_id, usage.provider_id, usage.gpu_class, usage.adjustment_for),
        )

    @property
    def gpu_hours(self) -> Fraction:
        """allocated_seconds / 3600, exact."""
        return Fraction(self.allocated_seconds, 3600)

    @property
    def netting_order(self) -> tuple[date, str, str, str, str]:
        """The key's netting order, without building the key."""
        return (self.day, self.firm_id, self.provider_id, self.gpu_class, self.adjustment_for or "")


@dataclass(frozen=True, slots=True)
class Credit:
    """Money one voucher paid on one item."""

    item: ItemKey
    voucher_id: str
    program_id: str
    firm_id: str
    amount: Decimal

    def __post_init__(self) -> None:
        _check_money(self.amount, "credit amount")
        if self.amount <= 0:
            raise _fail("a credit must be > 0")
        if self.firm_id != self.item.firm_id:
            raise _fail("a credit's firm_id must be its item's firm_id")

    @classmethod
    def drawn(cls, item: ItemKey, voucher_id: str, program_id: str, amount: Decimal) -> Credit:
        """A credit netting computed (amount > 0, whole fen, the item's own firm): not checked again."""
        return _build_credit(item, voucher_id, program_id, item.firm_id, amount)


_build_charge_item = unchecked_builder(ChargeItem)  # fastpath: see fastpath.py
_build_credit = unchecked_builder(Credit)
