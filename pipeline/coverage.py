"""The coverage report: per GPU, where every second of its windows went (GPU windows, schema v4), and
what does not add up. Pure formatting."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pipeline.report import hours_text

COLUMNS = ("provider", "host", "gpu", "class", "windows", "capacity_h", "sold_h", "unattributed_h", "idle_h",
           "unread_h", "unsampled_h")  # fmt: skip


def coverage_table(
    rows: Iterable[Sequence[Any]], uncovered: Iterable[tuple[str, str, int, int]] = ()
) -> tuple[str, int]:
    """(text, problems). ``rows``: ``UsageStore.coverage``; ``uncovered``: ``UsageStore.uncovered``.

    Capacity is the GPU windows' seconds; sold the seconds firms held (allocated); unread and
    unsampled the seconds nobody observed (the driver did not answer; the agent did not sample).
    A problem is a GPU window whose usage windows do not add up to it, time between a GPU's first
    and last GPU window that none covers (lost, or older than the agent's gap limit), GPU windows
    that overlap, or a usage window no GPU window accounts for."""
    lines: list[tuple[str, ...]] = [COLUMNS]
    problems: list[str] = []
    totals = [0] * 7
    for provider, host, gpu, cls, windows, *seconds, mismatched, missing in rows:
        parts = [int(x) for x in seconds]
        totals = [a + b for a, b in zip(totals, [int(windows), *parts], strict=True)]
        lines.append((provider, host, gpu, cls, str(windows), *(hours_text(x) for x in parts)))
        if mismatched:
            problems.append(f"{host} {gpu}: {mismatched} GPU window(s) whose usage windows do not add up to them")
        if missing > 0:
            problems.append(f"{host} {gpu}: {hours_text(missing)} h with no GPU window between its first and last")
        elif missing < 0:
            problems.append(f"{host} {gpu}: GPU windows overlap by {hours_text(-missing)} h (windows of two lengths)")
    for host, gpu, records, held in uncovered:
        problems.append(f"{host} {gpu}: {records} usage window(s) ({hours_text(held)} h) with no GPU window")
    if len(lines) == 1:
        return "no GPU windows in this period (agents before 0.3.0 send none)", len(problems)
    lines.append(("TOTAL", "", "", "", str(totals[0]), *(hours_text(x) for x in totals[1:])))
    widths = [max(len(r[i]) for r in lines) for i in range(len(COLUMNS))]
    out = []
    for n, r in enumerate(lines):
        cells = zip(r, widths, strict=True)
        out.append("  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(cells)))
        if n == 0 or n == len(lines) - 2:
            out.append("  ".join("-" * w for w in widths))
    out.append("")
    out += [f"PROBLEM {p}" for p in problems] or ["every GPU window adds up, none missing, every usage window covered"]
    return "\n".join(out), len(problems)
