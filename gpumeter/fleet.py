"""The fleet registry file: what each provider really has, with effective dates (docs/file-formats.md).

One CSV row per device and period: the GPU (or MIG instance) ``gpu_uuid`` sits in host
``host_id`` of provider ``provider_id`` as price class ``gpu_class`` from ``valid_from`` until
``valid_to`` (empty: still there). A GPU that moves or is re-classed gets a new row; its old row
ends where the new one starts, so its history stays. Pure: text in, ``FleetDevice`` rows out,
every problem of the file reported at once (``FILE:LINE: reason``).

Rules a whole file must keep (each refusal names the lines):
- ``window_seconds`` divides 3600 (what agents use), or is a whole number of hours dividing a
  day (imports); ``valid_from``/``valid_to`` fall on whole UTC hours and on that window grid, so a
  host's windows never straddle a change of registration;
- one GPU's periods never overlap, on one host or across hosts;
- rows of one host that overlap in time agree on its provider and window length;
- a MIG instance names its physical GPU as ``parent_uuid``; that GPU is then metered through its
  instances and may not have a row of its own overlapping theirs.

The agent prints its host's rows in this format (``gpumeter agent inventory``).
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from gpumeter.inputfiles import InputFileError, RowError, parse_csv_rows, text_field, timestamp, whole_number

FLEET_COLUMNS = (
    "provider_id", "host_id", "gpu_uuid", "gpu_class", "window_seconds", "valid_from", "valid_to", "parent_uuid",
)  # fmt: skip
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")  # provider, host and GPU ids; a GPU UUID fits
MAX_PERIODS = 8  # rows one GPU may have in a file (its moves and re-classings); the checks look up at most these
HOUR_S = 3600
DAY_S = 86_400
OPEN_END = datetime(2106, 2, 7, 6, 0, tzinfo=UTC)  # "still there": the last whole hour a DateTime holds


@dataclass(frozen=True, slots=True)
class FleetDevice:
    line: int
    provider_id: str
    host_id: str
    gpu_uuid: str
    gpu_class: str
    window_seconds: int
    valid_from: datetime  # aware UTC, whole hour
    valid_to: datetime  # aware UTC, whole hour; OPEN_END when the file leaves it empty
    parent_uuid: str  # '' unless a MIG instance

    def overlaps(self, other: FleetDevice) -> bool:
        return self.valid_from < other.valid_to and other.valid_from < self.valid_to


def _id(value: str, name: str) -> str:
    text = text_field(value, name)
    if not ID.fullmatch(text):
        raise RowError(f"{name} {text!r} must be letters, digits and . _ : - (at most 128)")
    return text


def _hour(value: str, name: str) -> datetime:
    t = timestamp(value, name)
    if t.minute or t.second or t.microsecond:
        raise RowError(f"{name} {value.strip()!r} must fall on a whole hour")
    return t


def _device(line: int, row: dict[str, str]) -> FleetDevice:
    window = whole_number(row["window_seconds"], "window_seconds", minimum=1, maximum=DAY_S)
    if HOUR_S % window if window <= HOUR_S else DAY_S % window:
        raise RowError(f"window_seconds {window} must divide 3600 (e.g. 60, 300, 3600) or 86400 (e.g. 86400)")
    start = _hour(row["valid_from"], "valid_from")
    end = _hour(row["valid_to"], "valid_to") if row["valid_to"].strip() else OPEN_END
    for name, t in (("valid_from", start), ("valid_to", end)):
        if t != OPEN_END and int(t.timestamp()) % window:
            raise RowError(f"{name} {row[name].strip()} must fall on the host's {window} s window grid")
    if end <= start:
        raise RowError(f"valid_to {row['valid_to'].strip()} must be after valid_from {row['valid_from'].strip()}")
    if end > OPEN_END:
        raise RowError(f"valid_to must be before {OPEN_END:%Y-%m-%d}, or empty for a device still there")
    parent = _id(row["parent_uuid"], "parent_uuid") if row["parent_uuid"].strip() else ""
    gpu = _id(row["gpu_uuid"], "gpu_uuid")
    if parent == gpu:
        raise RowError("parent_uuid must be the physical GPU of a MIG instance, not the instance itself")
    return FleetDevice(
        line, _id(row["provider_id"], "provider_id"), _id(row["host_id"], "host_id"), gpu,
        _id(row["gpu_class"], "gpu_class"), window, start, end, parent,
    )  # fmt: skip


def _cross_checks(devices: list[FleetDevice]) -> list[tuple[int, str]]:
    problems: list[tuple[int, str]] = []
    by_gpu: dict[str, list[FleetDevice]] = defaultdict(list)
    by_host: dict[str, list[FleetDevice]] = defaultdict(list)
    for d in devices:
        by_gpu[d.gpu_uuid].append(d)
        by_host[d.host_id].append(d)
    for rows in by_gpu.values():
        if len(rows) > MAX_PERIODS:
            problems.append((rows[MAX_PERIODS].line, f"GPU {rows[0].gpu_uuid} has more than {MAX_PERIODS} rows; "
                             "drop the periods that ended before any usage still to settle"))  # fmt: skip
        for i, b in enumerate(rows):
            for a in rows[:i]:
                if a.overlaps(b):
                    problems.append((b.line, f"GPU {b.gpu_uuid} is also registered for this time on line {a.line}"))
                    break
    for rows in by_host.values():  # each row against the first earlier one it contradicts
        for i, b in enumerate(rows):
            for a in rows[:i]:
                if not a.overlaps(b):
                    continue
                if a.provider_id != b.provider_id:
                    problems.append((b.line, f"host {b.host_id} belongs to {a.provider_id} on line {a.line}"))
                    break
                if a.window_seconds != b.window_seconds:
                    problems.append(
                        (b.line, f"host {b.host_id} has window_seconds {a.window_seconds} on line {a.line}")
                    )
                    break
    for d in devices:
        if not d.parent_uuid:
            continue
        for p in by_gpu.get(d.parent_uuid, []):
            if p.overlaps(d):
                reason = f"GPU {p.gpu_uuid} is in MIG mode (instance on line {d.line}): register its instances only"
                problems.append((p.line, reason))
    return sorted(set(problems))


def read_fleet(path: Path) -> list[FleetDevice]:
    """Every row of a fleet file, checked whole; InputFileError listing every problem, else the rows."""
    devices, problems = parse_csv_rows(path, FLEET_COLUMNS, _device)
    problems += _cross_checks(devices)
    if not devices and not problems:
        problems.append((1, "no devices: a fleet file lists at least one GPU"))
    if problems:
        raise InputFileError(path, sorted(problems))
    return devices


def fleet_digest(devices: list[FleetDevice]) -> str:
    """sha256 of the rows' content in a fixed order, whatever the file's order and line numbers."""
    rows = sorted(
        "\x1f".join((d.provider_id, d.host_id, d.gpu_uuid, d.gpu_class, str(d.window_seconds),
                     d.valid_from.isoformat(), d.valid_to.isoformat(), d.parent_uuid))
        for d in devices
    )  # fmt: skip
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def csv_line(values: dict[str, str]) -> str:
    """One row of a fleet file in FLEET_COLUMNS order (the agent's inventory writes these)."""
    return ",".join(values.get(c, "") for c in FLEET_COLUMNS)


def fleet_text(rows: list[dict[str, str]]) -> str:
    """A fleet file's text: the header line, then one line per row."""
    return "".join(line + "\n" for line in [",".join(FLEET_COLUMNS), *(csv_line(r) for r in rows)])
