"""Plain-text tables of usage. Hours are exact Fractions summed from seconds and shown rounded."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import date
from decimal import ROUND_HALF_UP, Decimal

HOUR_PLACES = Decimal("0.000001")


def hours_text(seconds: int) -> str:
    """Seconds as GPU-hours, rounded half-up to 6 places for display only."""
    return str((Decimal(seconds) / Decimal(3600)).quantize(HOUR_PLACES, rounding=ROUND_HALF_UP))


def gpu_hours_table(rows: Iterable[tuple[str, date, str, str, int, int]], detailed: bool = False) -> str:
    totals: dict[tuple[str, ...], int] = defaultdict(int)
    for firm, day, provider, cls, seconds, _records in rows:
        key = (firm, day.isoformat(), provider, cls) if detailed else (firm, cls)
        totals[key] += seconds
    header = ("firm", "day", "provider", "gpu_class") if detailed else ("firm", "gpu_class")
    lines = [(*header, "gpu_hours")]
    lines += [(*key, hours_text(totals[key])) for key in sorted(totals)]
    lines.append(("TOTAL", *([""] * (len(header) - 1)), hours_text(sum(totals.values()))))
    widths = [max(len(r[i]) for r in lines) for i in range(len(header) + 1)]
    out = []
    for n, r in enumerate(lines):
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths[:-1], strict=True)] + [r[-1].rjust(widths[-1])]
        out.append("  ".join(cells))
        if n == 0 or n == len(lines) - 2:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
