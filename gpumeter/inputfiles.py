"""Files people write, read and validated whole: every problem reported as ``FILE:LINE: reason``.

A reader collects the problems of every row (``parse_csv_rows``), the caller adds what it
finds checking the good rows further, and one ``InputFileError`` (``InputFilesError`` for
several files, ``refuse``) lists them all; a file with one problem is refused whole, so the
caller writes nothing. The field parsers raise ``RowError`` with the reason; the CSV reader
adds the line.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from gpumeter.errors import GpumeterError

MAX_REPORTED = 50
T = TypeVar("T")


class InputFileError(GpumeterError):
    """One or more bad rows in an input file; nothing was written."""

    code = "bad_input_file"

    def __init__(self, path: Path, problems: list[tuple[int, str]]) -> None:
        self.path = path
        self.problems = problems
        shown = [f"{path}:{line}: {reason}" for line, reason in problems[:MAX_REPORTED]]
        more = len(problems) - MAX_REPORTED
        if more > 0:
            shown.append(f"... and {more} more problem(s)")
        super().__init__(f"{path} refused, nothing written:\n" + "\n".join(shown))


class InputFilesError(GpumeterError):
    """Problems in several input files at once (each listed as ``InputFileError`` does); nothing was written."""

    code = "bad_input_file"

    def __init__(self, errors: list[InputFileError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


def refuse(problems: dict[Path, list[tuple[int, str]]]) -> None:
    """Raise one error naming every problem of every file (by line), if there is any."""
    errors = [InputFileError(path, sorted(found)) for path, found in problems.items() if found]
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise InputFilesError(errors)


class RowError(ValueError):
    """A reason, raised while parsing one row."""


def text_field(value: object, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RowError(f"{name} is missing")
    return value.strip()


def whole_number(value: object, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool):
        raise RowError(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,30}\s*", value):
        number = int(value)
    else:
        raise RowError(f"{name} must be a whole number, got {value!r}")
    if minimum is not None and number < minimum:
        raise RowError(f"{name} must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise RowError(f"{name} must be <= {maximum}, got {number}")
    return number


def timestamp(value: str, name: str) -> datetime:
    """An ISO-8601 timestamp with a UTC offset, as an aware UTC datetime."""
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise RowError(f"{name} {value!r} is not an ISO-8601 timestamp") from None
    if parsed.tzinfo is None:
        raise RowError(f"{name} {value!r} has no UTC offset")
    return parsed.astimezone(UTC)


def csv_rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) for every non-empty data line; header checked first.

    The header must name exactly ``columns`` (any order, none unknown or repeated); blank
    lines are skipped; a UTF-8 byte-order mark is accepted. A row of the wrong width comes
    back as ``{"__error__": reason}``.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputFileError(path, [(0, "file not found")]) from None
    except IsADirectoryError:
        raise InputFileError(path, [(0, "is a folder, not a file")]) from None
    except UnicodeDecodeError as exc:
        raise InputFileError(path, [(0, f"not UTF-8 text ({exc.reason} at byte {exc.start})")]) from None
    except OSError as exc:  # not readable (permissions, an I/O error)
        raise InputFileError(path, [(0, f"cannot be read: {exc.strerror or exc}")]) from None
    reader = csv.reader(text.splitlines())
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise InputFileError(path, [(1, "empty file: expected a header line")]) from None
    missing = [c for c in columns if c not in header]
    unknown = [h for h in header if h not in columns]
    duplicated = sorted({h for h in header if header.count(h) > 1})
    problems = []
    if missing:
        problems.append(f"header lacks column(s) {', '.join(missing)}")
    if unknown:
        problems.append(f"header has unknown column(s) {', '.join(unknown)}")
    if duplicated:
        problems.append(f"header repeats column(s) {', '.join(duplicated)}")
    if problems:
        raise InputFileError(path, [(1, "; ".join(problems) + f" (expected: {', '.join(columns)})")])
    for number, cells in enumerate(reader, start=2):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            yield number, {"__error__": f"has {len(cells)} field(s), the header has {len(header)}"}
            continue
        yield number, dict(zip(header, cells, strict=True))


def parse_csv(path: Path, columns: tuple[str, ...], parse: Callable[[int, dict[str, str]], T]) -> list[T]:
    """``parse(line, row)`` of every row; InputFileError listing every row that raised RowError."""
    out, problems = parse_csv_rows(path, columns, parse)
    if problems:
        raise InputFileError(path, problems)
    return out


def parse_csv_rows(
    path: Path, columns: tuple[str, ...], parse: Callable[[int, dict[str, str]], T]
) -> tuple[list[T], list[tuple[int, str]]]:
    """(``parse(line, row)`` of every good row, (line, reason) of every bad one), for a caller that
    checks the good rows further before it reports everything at once."""
    out: list[T] = []
    problems: list[tuple[int, str]] = []
    for number, row in csv_rows(path, columns):
        if "__error__" in row:
            problems.append((number, row["__error__"]))
            continue
        try:
            out.append(parse(number, row))
        except RowError as exc:
            problems.append((number, str(exc)))
    return out, problems
