"""Exact money helpers.

Decimals are built from ``str`` or ``int`` only. Rounding happens at named points,
always ROUND_HALF_UP with the mode written out; exact intermediate values (hours x
price, rate x amount) are ``Fraction`` and are rounded by integer arithmetic, so no
Decimal context precision can creep in. The public entry points of the core run under
``EXACT_CONTEXT`` (see ``exact_decimal``): whatever the caller's thread context is, an
addition that would have to round raises instead of silently losing a fen.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from decimal import (
    ROUND_HALF_UP,
    Context,
    Decimal,
    DivisionByZero,
    Inexact,
    InvalidOperation,
    Overflow,
    localcontext,
)
from fractions import Fraction
from typing import ParamSpec, TypeVar

from billing.core.model import BillingError

CENT = Decimal("0.01")
ZERO = Decimal("0.00")  # money zero, two places
HOURS_DISPLAY_PLACES = 6
SECONDS_PER_HOUR = 3600
_MAX_DIGITS = 28  # the default Decimal precision: sums of such values stay exact
_NUMBER_RE = re.compile(r"\A(-?)(\d+)(?:\.(\d+))?\Z")

# Arithmetic that must never round: any inexact Decimal operation raises Inexact.
EXACT_CONTEXT = Context(prec=60, rounding=ROUND_HALF_UP, traps=[InvalidOperation, DivisionByZero, Overflow, Inexact])
# The one place a Decimal is rounded on purpose (round_money): explicit mode, no traps on rounding.
_ROUNDING_CONTEXT = Context(prec=60, rounding=ROUND_HALF_UP, traps=[InvalidOperation, Overflow])

# n x 0.01 under EXACT_CONTEXT: exact (or Inexact raised), and three times faster than scaleb
_in_cents = EXACT_CONTEXT.multiply

_P = ParamSpec("_P")
_R = TypeVar("_R")


def exact_decimal(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``func`` under EXACT_CONTEXT, independent of the caller's Decimal context."""

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with localcontext(EXACT_CONTEXT):
            return func(*args, **kwargs)

    return wrapper


class MoneyFormatError(BillingError, ValueError):
    """A money, price or rate text is not a plain finite decimal of the allowed form."""

    code = "invalid_money"


def round_money(value: Decimal) -> Decimal:
    """Round a Decimal to the cent, half-up (0.005 -> 0.01)."""
    return value.quantize(CENT, rounding=ROUND_HALF_UP, context=_ROUNDING_CONTEXT)


def round_fraction_half_up(value: Fraction, places: int) -> Decimal:
    """Round an exact rational to ``places`` decimals, half away from zero, exactly.

    Built from the integer digits, so the Decimal context never rounds anything.
    """
    if places < 0:
        raise ValueError("places must be >= 0")
    scaled = value * 10**places
    quotient, remainder = divmod(abs(scaled.numerator), scaled.denominator)
    if 2 * remainder >= scaled.denominator:
        quotient += 1
    sign = 1 if scaled < 0 and quotient != 0 else 0
    digits = tuple(int(ch) for ch in str(quotient))
    return Decimal((sign, digits, -places))


def round_fraction_to_cent(value: Fraction) -> Decimal:
    return round_fraction_half_up(value, 2)


def gpu_hours_of(allocated_seconds: int) -> Fraction:
    """Exact GPU-hours of ``allocated_seconds``."""
    return Fraction(allocated_seconds, SECONDS_PER_HOUR)


def half_up(numerator: int, denominator: int) -> int:
    """numerator/denominator (>= 0, denominator > 0) rounded half-up to an integer: floor(x + 1/2)."""
    return (2 * numerator + denominator) // (2 * denominator)


def _half_up_cents(numerator: int, denominator: int) -> Decimal:
    """numerator/denominator (currency units, >= 0) rounded half-up to the cent, in integers."""
    return from_cents(half_up(numerator * 100, denominator))


def charge_amount(allocated_seconds: int, price_per_gpu_hour: Decimal) -> Decimal:
    """round_half_up(allocated_seconds / 3600 x price) to the cent, from exact hours.

    Integer arithmetic on the exact ratio of the price: the hot path of a settlement,
    equal to ``round_fraction_to_cent(gpu_hours_of(s) * Fraction(price))`` (a test checks).
    """
    if allocated_seconds < 0 or price_per_gpu_hour < 0:
        return round_fraction_to_cent(gpu_hours_of(allocated_seconds) * Fraction(price_per_gpu_hour))
    n, d = price_per_gpu_hour.as_integer_ratio()
    return _half_up_cents(allocated_seconds * n, SECONDS_PER_HOUR * d)


def to_cents(amount: Decimal) -> int:
    """A whole-fen amount as an integer count of fen; refuses one below the fen."""
    numerator, denominator = amount.as_integer_ratio()
    cents, remainder = divmod(numerator * 100, denominator)
    if remainder:
        raise MoneyFormatError(f"amount {amount!r} has more than 2 decimal places")
    return cents


def from_cents(cents: int) -> Decimal:
    """An integer count of fen as money (a Decimal with two places)."""
    return _in_cents(Decimal(cents), CENT)


def subsidy_cents(rate: tuple[int, int], uncovered_cents: int) -> int:
    """round_half_up(subsidy_rate x uncovered) in fen, for a rate given as (numerator, denominator) > 0
    and uncovered >= 0 fen: floor(rate x uncovered + 1/2), in integers. Equal to
    ``round_fraction_to_cent(Fraction(rate) * Fraction(uncovered))`` (a test checks)."""
    return half_up(rate[0] * uncovered_cents, rate[1])


def format_money(amount: Decimal) -> str:
    """Decimal string with exactly two places; refuses a value needing rounding."""
    if amount != round_money(amount):
        raise MoneyFormatError(f"amount {amount!r} has more than 2 decimal places")
    return format(round_money(amount), "f")


def format_decimal(value: Decimal) -> str:
    """Plain (never scientific) decimal string of ``value``."""
    return format(value, "f")


def format_gpu_hours(gpu_hours: Fraction) -> str:
    """Display form of exact hours: half-up to 6 places. Never feed this back into money."""
    return format(round_fraction_half_up(gpu_hours, HOURS_DISPLAY_PLACES), "f")


def parse_decimal(
    text: str, *, max_places: int | None = None, allow_negative: bool = False, what: str = "value"
) -> Decimal:
    """Strictly parse a plain decimal text such as ``"12"`` or ``"-3.50"``.

    Refused: non-``str`` input (floats above all), exponents, NaN, infinities, signs
    other than a leading ``-`` (and that only with ``allow_negative``), separators,
    and more than ``max_places`` decimals.
    """
    if not isinstance(text, str):
        raise MoneyFormatError(f"{what} must be given as text, got {type(text).__name__}")
    match = _NUMBER_RE.match(text.strip())
    if match is None:
        raise MoneyFormatError(f"{what} {text!r} is not a plain decimal number")
    sign, integer_digits, fraction_digits = match.groups()
    if len(integer_digits) + len(fraction_digits or "") > _MAX_DIGITS:
        raise MoneyFormatError(f"{what} {text!r} has more than {_MAX_DIGITS} digits")
    if sign and not allow_negative:
        raise MoneyFormatError(f"{what} {text!r} must not be negative")
    if max_places is not None and fraction_digits and len(fraction_digits) > max_places:
        raise MoneyFormatError(f"{what} {text!r} has more than {max_places} decimal places")
    return Decimal(text.strip())


def parse_money(text: str, *, allow_negative: bool = False) -> Decimal:
    """Money text (at most 2 places) -> Decimal with exactly 2 places."""
    return round_money(parse_decimal(text, max_places=2, allow_negative=allow_negative, what="amount"))


def parse_price(text: str) -> Decimal:
    """A non-negative price per GPU-hour, any number of places, kept exactly as written."""
    return parse_decimal(text, what="price")


def parse_subsidy_rate(text: str) -> Decimal:
    """A subsidy rate r with 0 < r <= 1."""
    rate = parse_decimal(text, what="subsidy_rate")
    if not Decimal(0) < rate <= Decimal(1):
        raise MoneyFormatError(f"subsidy_rate {text!r} must satisfy 0 < rate <= 1")
    return rate
