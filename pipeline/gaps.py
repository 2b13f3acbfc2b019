"""The gap report: per agent, which sequence numbers never reached ClickHouse. Pure formatting."""

from __future__ import annotations

from collections.abc import Iterable


def gaps_table(extents: Iterable[tuple[str, int, int, int]], gaps: Iterable[tuple[str, int, int, int]]) -> str:
    """``extents``: (host_id, lowest seq, highest seq, distinct seqs); ``gaps``: (host_id, first, last, _)."""
    by_host: dict[str, list[tuple[int, int]]] = {}
    for host, first, last, _seen in gaps:
        by_host.setdefault(host, []).append((first, last))
    lines = []
    for host, low, high, seen in sorted(extents):
        ranges = sorted(by_host.get(host, []))
        missing = sum(b - a + 1 for a, b in ranges)
        status = "complete" if not ranges else f"{missing} missing"
        lines.append(f"{host}: seq {low}..{high}, {seen} seen, {status}")
        lines += [f"  missing {a}" if a == b else f"  missing {a}..{b}" for a, b in ranges]
    if not lines:
        return "no usage from any agent yet"
    return "\n".join(lines)
