"""Usage windows from a CSV file (``gpumeter usage import``): parsed here, checked by the store.

This module reads the format only (columns, numbers, timestamps). Whether a window is
plausible - its record id, its length, its seconds and energy, its time - is decided by
the same rules the Kafka loader applies (``schema.WINDOW_CHECKS``), which
``UsageStore.rejected`` runs over the parsed rows before anything is written.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime
from pathlib import Path

from gpumeter.inputfiles import RowError, parse_csv_rows, text_field, timestamp, whole_number
from pipeline.usage_store import ImportWindow

USAGE_COLUMNS = (
    "record_id", "window_start", "window_end", "provider_id", "host_id", "gpu_uuid", "gpu_class",
    "firm_id", "allocated_seconds", "busy_seconds", "energy_joules",
)  # fmt: skip
ALLOCATED_SECONDS_RANGE = (-(2**63), 2**63 - 1)  # what the checks' Int64 holds; the checks bound it
_DECIMAL = re.compile(r"\A-?\d{1,15}(?:\.\d{1,9})?\Z")


def _instant(value: str, name: str) -> datetime:
    parsed = timestamp(value, name)
    if parsed.microsecond % 1000:
        raise RowError(f"{name} {value.strip()!r} is finer than a millisecond")
    return parsed


def _optional_number(value: str, name: str) -> float | None:
    """Empty: unknown (None). Else a plain decimal (the window checks bound it)."""
    text = value.strip()
    if not text:
        return None
    if not _DECIMAL.match(text):
        raise RowError(f"{name} must be a plain decimal number like 12.5, got {text!r}")
    return float(text)  # at most 15 integer digits: always finite


def read_usage(path: Path) -> tuple[list[ImportWindow], list[tuple[int, str]]]:
    """(every well-formed window of ``path``, (line, reason) of every row that is not, and of every
    row whose record_id an earlier row has with different content); a bad header or an unreadable
    file raises InputFileError. A row repeated exactly counts once."""

    def parse(line: int, r: dict[str, str]) -> ImportWindow:
        return ImportWindow(
            line=line,
            record_id=text_field(r["record_id"], "record_id"),
            window_start=_instant(r["window_start"], "window_start"),
            window_end=_instant(r["window_end"], "window_end"),
            provider_id=text_field(r["provider_id"], "provider_id"),
            host_id=text_field(r["host_id"], "host_id"),
            gpu_uuid=text_field(r["gpu_uuid"], "gpu_uuid"),
            gpu_class=text_field(r["gpu_class"], "gpu_class"),
            firm_id=text_field(r["firm_id"], "firm_id"),
            allocated_seconds=whole_number(r["allocated_seconds"], "allocated_seconds", *ALLOCATED_SECONDS_RANGE),
            busy_seconds=_optional_number(r["busy_seconds"], "busy_seconds"),
            energy_joules=_optional_number(r["energy_joules"], "energy_joules"),
        )

    windows, problems = parse_csv_rows(path, USAGE_COLUMNS, parse)
    first: dict[str, ImportWindow] = {}
    for w in windows:
        seen = first.setdefault(w.record_id, w)
        if seen is not w and dataclasses.replace(seen, line=w.line) != w:
            problems.append(
                (w.line, f"record_id {w.record_id} is also on line {seen.line} with different content: "
                         "one window cannot have two accounts; keep the right row")
            )  # fmt: skip
    if not windows and not problems:
        problems.append((1, "no rows: a file that imports nothing is refused"))
    return windows, problems
