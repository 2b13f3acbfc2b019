"""Billing's input files (docs/file-formats.md): rate card, programs, vouchers, firms, validated whole.

Each reader returns the rows that parsed and, as (line, reason), every problem of the
file found in one pass: each bad row, each id defined twice differently, a file with no
rows. A file that cannot be read at all (missing, not UTF-8, not TOML, a wrong CSV
header) raises ``InputFileError``. The caller checks the good rows against the store,
reports everything at once (``FILE:LINE: reason``) and, with one problem anywhere,
writes nothing. Readers never write anything themselves.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from billing.core.model import AutoGrant, BillingError, Firm, Program, Rate, Voucher
from billing.core.money import parse_money, parse_price, parse_subsidy_rate
from gpumeter.inputfiles import InputFileError, RowError, parse_csv_rows, text_field, whole_number
from gpumeter.record import FIRM_ID_PATTERN, UNATTRIBUTED

T = TypeVar("T")
Problems = list[tuple[int, str]]
FIRM_ID = re.compile(FIRM_ID_PATTERN)
NO_ROWS = "no rows: a file that loads nothing is refused (leave its option out instead)"

VOUCHER_COLUMNS = (
    "voucher_id", "program_id", "firm_id", "face_value", "subsidy_rate",
    "valid_from", "valid_until", "priority",
)  # fmt: skip
FIRM_COLUMNS = ("firm_id", "name", "payment_terms_days")


@dataclass(frozen=True, slots=True)
class RateCardFile:
    currency: str
    timezone: str
    rates: tuple[Rate, ...]
    lines: dict[tuple[str, str, date], int]  # (gpu_class, provider, effective_from) -> line of its table
    usage_horizon_days: int | None = None  # docs/usage-checks.md 3.2; None: the default


# ---------------------------------------------------------------- field parsers


def _number_text(value: object, name: str) -> str:
    """Money and rates as text. A TOML integer is exact; a TOML float is taken by the
    literal it was written as (its shortest repr), which is exact for any literal of
    up to 15 significant digits; a bool or anything else is refused."""
    if isinstance(value, bool):
        raise RowError(f"{name} must be a decimal number, got {value!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        if "e" in text or "inf" in text or "nan" in text:
            raise RowError(f"{name} {value!r} is not a plain decimal; write it as a string")
        return text
    if isinstance(value, str):
        return value.strip()
    raise RowError(f"{name} must be a decimal number, got {value!r}")


def _wrap(func: Callable[[str], T], value: str, name: str) -> T:
    try:
        return func(value)
    except (BillingError, ValueError) as exc:
        message = str(exc)
        raise RowError(message if name in message else f"{name}: {message}") from None


def _day(value: object, name: str) -> date:
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise RowError(f"{name} must be a date YYYY-MM-DD, got {value!r}")


def _firm_id(value: str) -> str:
    """A firm id by the one rule agents, usage files and billing share (gpumeter.record)."""
    firm_id = text_field(value, "firm_id")
    if firm_id == UNATTRIBUTED or not FIRM_ID.fullmatch(firm_id):
        raise RowError(
            f"firm_id {firm_id!r} is not a firm id: 1 to 64 letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit, and not {UNATTRIBUTED!r} (the same rule the agents' records follow)"
        )
    return firm_id


# ---------------------------------------------------------------- CSV


def read_vouchers(path: Path) -> tuple[list[tuple[int, Voucher]], Problems]:
    def parse(line: int, r: dict[str, str]) -> Voucher:
        voucher_id = text_field(r["voucher_id"], "voucher_id")
        try:
            return Voucher(
                voucher_id=voucher_id,
                program_id=text_field(r["program_id"], "program_id"),
                firm_id=_firm_id(r["firm_id"]),
                face_value=_wrap(parse_money, r["face_value"], "face_value"),
                subsidy_rate=_wrap(parse_subsidy_rate, r["subsidy_rate"], "subsidy_rate"),
                valid_from=_day(r["valid_from"], "valid_from"),
                valid_until=_day(r["valid_until"], "valid_until"),
                priority=whole_number(r["priority"], "priority"),
            )
        except BillingError as exc:
            raise RowError(str(exc)) from None

    return _unique(*parse_csv_rows(path, VOUCHER_COLUMNS, _with_line(parse)), lambda v: v.voucher_id, "voucher_id")


def read_firms(path: Path) -> tuple[list[tuple[int, Firm]], Problems]:
    def parse(line: int, r: dict[str, str]) -> Firm:
        terms = r["payment_terms_days"].strip()
        try:
            return Firm(
                firm_id=_firm_id(r["firm_id"]),
                name=r["name"].strip(),
                payment_terms_days=whole_number(terms, "payment_terms_days", minimum=0) if terms else 30,
            )
        except BillingError as exc:
            raise RowError(str(exc)) from None

    return _unique(*parse_csv_rows(path, FIRM_COLUMNS, _with_line(parse)), lambda f: f.firm_id, "firm_id")


def _with_line(parse: Callable[[int, dict[str, str]], T]) -> Callable[[int, dict[str, str]], tuple[int, T]]:
    return lambda line, row: (line, parse(line, row))


def _unique(
    rows: list[tuple[int, T]], problems: Problems, key: Callable[[T], str], name: str
) -> tuple[list[tuple[int, T]], Problems]:
    """(line, object) per id, and the problems with one more per id that two different rows define
    (identical repeats are harmless), or for a file with no rows at all."""
    first: dict[str, tuple[int, T]] = {}
    problems = list(problems)
    for line, obj in rows:
        k = key(obj)
        if k in first and first[k][1] != obj:
            problems.append((line, f"{name} {k} already defined differently on line {first[k][0]}"))
        first.setdefault(k, (line, obj))
    if not rows and not problems:
        problems.append((1, NO_ROWS))
    return list(first.values()), problems


# ---------------------------------------------------------------- TOML


def _load_toml(path: Path) -> tuple[dict[str, Any], str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputFileError(path, [(0, "file not found")]) from None
    except IsADirectoryError:
        raise InputFileError(path, [(0, "is a folder, not a file")]) from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise InputFileError(path, [(line, f"not UTF-8 text ({exc.reason} at byte {exc.start})")]) from None
    except OSError as exc:  # not readable (permissions, an I/O error)
        raise InputFileError(path, [(0, f"cannot be read: {exc.strerror or exc}")]) from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        raise InputFileError(path, [(int(match.group(1)) if match else 0, f"not valid TOML: {exc}")]) from None


def _table_lines(text: str, name: str) -> list[int]:
    """Line numbers of each ``[[name]]`` header, to point errors at the right table."""
    pattern = re.compile(rf"^\s*\[\[\s*{re.escape(name)}\s*\]\]")
    return [n for n, line in enumerate(text.splitlines(), start=1) if pattern.match(line)]


def _tables(
    data: dict[str, Any], text: str, name: str, allowed_top: set[str], problems: Problems
) -> list[tuple[int, Any]]:
    """(line, table) of each ``[[name]]``; a problem for unknown top-level keys, a ``name`` that is
    not an array of tables, or none at all."""
    unknown = sorted(set(data) - allowed_top - {name})
    if unknown:
        problems.append((1, f"unknown top-level key(s) {', '.join(unknown)}"))
    tables = data.get(name, [])
    if not isinstance(tables, list):
        problems.append((1, f"'{name}' must be an array of tables: [[{name}]]"))
        return []
    if not tables:
        problems.append((1, f"no [[{name}]] tables: " + NO_ROWS.removeprefix("no rows: ")))
    lines = _table_lines(text, name)
    return [(lines[i] if i < len(lines) else 0, t) for i, t in enumerate(tables)]


def _check_keys(table: Any, required: set[str], optional: set[str]) -> None:
    if not isinstance(table, dict):
        raise RowError("must be a table")
    missing = sorted(required - set(table))
    unknown = sorted(set(table) - required - optional)
    if missing:
        raise RowError(f"missing key(s) {', '.join(missing)}")
    if unknown:
        raise RowError(f"unknown key(s) {', '.join(unknown)}")


def read_rate_card(path: Path) -> tuple[RateCardFile, Problems]:
    data, text = _load_toml(path)
    problems: list[tuple[int, str]] = []
    currency = data.get("currency", "CNY")
    timezone = data.get("timezone", "UTC")
    if not isinstance(currency, str) or not re.fullmatch(r"[A-Z]{3}", currency):
        problems.append((1, f"currency must be a 3-letter code such as CNY, got {currency!r}"))
    try:
        ZoneInfo(str(timezone))
    except (ZoneInfoNotFoundError, ValueError):
        problems.append((1, f"timezone {timezone!r} is not an IANA time zone such as Asia/Shanghai"))
    horizon = data.get("usage_horizon_days")
    if horizon is not None and (isinstance(horizon, bool) or not isinstance(horizon, int) or not 1 <= horizon <= 3660):
        problems.append((1, f"usage_horizon_days must be a whole number of days from 1 to 3660, got {horizon!r}"))
    rates: list[tuple[int, Rate]] = []
    for line, table in _tables(data, text, "rate", {"currency", "timezone", "usage_horizon_days"}, problems):
        try:
            _check_keys(table, {"gpu_class", "provider", "price_per_gpu_hour", "effective_from"}, set())
            price_text = table["price_per_gpu_hour"]
            if not isinstance(price_text, str):
                raise RowError(f'price_per_gpu_hour must be a string such as "12.50", got {price_text!r}')
            rate = Rate(
                gpu_class=text_field(table["gpu_class"], "gpu_class"),
                provider=text_field(table["provider"], "provider"),
                price_per_gpu_hour=_wrap(parse_price, price_text, "price_per_gpu_hour"),
                effective_from=_day(table["effective_from"], "effective_from"),
            )
            rates.append((line, rate))
        except (RowError, BillingError) as exc:
            problems.append((line, f"[[rate]]: {exc}"))
    seen: dict[tuple[str, str, date], tuple[int, Decimal]] = {}
    for line, rate in rates:
        key = (rate.gpu_class, rate.provider, rate.effective_from)
        if key in seen and seen[key][1] != rate.price_per_gpu_hour:
            problems.append((line, f"[[rate]]: a different price for the same gpu_class, provider and "
                                   f"effective_from is on line {seen[key][0]}"))  # fmt: skip
        seen.setdefault(key, (line, rate.price_per_gpu_hour))
    unique = {(r.gpu_class, r.provider, r.effective_from): r for _, r in rates}
    lines = {k: line for k, (line, _) in seen.items()}
    return RateCardFile(
        str(currency), str(timezone), tuple(unique[k] for k in sorted(unique)), lines,
        horizon if isinstance(horizon, int) and not isinstance(horizon, bool) else None,
    ), sorted(problems)  # fmt: skip


def read_programs(path: Path) -> tuple[list[tuple[int, Program]], Problems]:
    data, text = _load_toml(path)
    problems: list[tuple[int, str]] = []
    programs: list[tuple[int, Program]] = []
    for line, table in _tables(data, text, "program", set(), problems):
        try:
            _check_keys(table, {"id", "year", "category", "budget", "firm_cap"}, {"auto_grant"})
            grant = None
            if "auto_grant" in table:
                g = table["auto_grant"]
                _check_keys(g, {"face_value", "subsidy_rate"}, set())
                grant = AutoGrant(
                    face_value=_wrap(parse_money, _number_text(g["face_value"], "face_value"), "auto_grant.face_value"),
                    subsidy_rate=_wrap(
                        parse_subsidy_rate,
                        _number_text(g["subsidy_rate"], "subsidy_rate"),
                        "auto_grant.subsidy_rate",
                    ),
                )
            programs.append(
                (
                    line,
                    Program(
                        program_id=text_field(table["id"], "id"),
                        year=whole_number(table["year"], "year", minimum=1),
                        category=text_field(table["category"], "category"),
                        budget=_wrap(parse_money, _number_text(table["budget"], "budget"), "budget"),
                        firm_cap=_wrap(parse_money, _number_text(table["firm_cap"], "firm_cap"), "firm_cap"),
                        auto_grant=grant,
                    ),
                )
            )
        except (RowError, BillingError) as exc:
            problems.append((line, f"[[program]]: {exc}"))
    return _unique(programs, problems, lambda p: p.program_id, "program id")
