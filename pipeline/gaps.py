"""The gap report: per agent, which sequence numbers never reached ClickHouse, and which agents went
silent. Pure formatting."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

SILENT_AFTER_S = 300  # an agent sends something at least every minute (agent/sender.py HEARTBEAT_S)


def gaps_table(
    extents: Iterable[tuple[str, int, int, int]],
    gaps: Iterable[tuple[str, int, int, int]],
    contact: Iterable[tuple[str, int, datetime]] = (),
    now: datetime | None = None,
    silent_after_s: float = SILENT_AFTER_S,
    registered: Iterable[str] = (),
) -> str:
    """``extents``: (host_id, lowest seq, highest seq, distinct seqs); ``gaps``: (host_id, first, last, _);
    ``contact``: (host_id, high-water seq, last heard); ``registered``: hosts that should be sending.

    A gap inside the seqs seen is listed; so is a missing tail, from the highest seq seen to the
    agent's high-water mark; an agent not heard from for ``silent_after_s`` is "silent since".
    """
    by_host: dict[str, list[tuple[int, int]]] = {}
    for host, first, last, _seen in gaps:
        by_host.setdefault(host, []).append((first, last))
    seen = {host: (low, high, n) for host, low, high, n in extents}
    heard: dict[str, tuple[int, datetime | None]] = {host: (hw, at) for host, hw, at in contact}
    now = now or datetime.now(UTC)
    lines = []
    for host in sorted(set(seen) | set(heard) | set(registered)):
        if host not in seen and host not in heard:
            lines.append(f"{host}: never heard from (registered in the keys file)")
            continue
        high_water, heard_at = heard.get(host, (-1, None))
        ranges = sorted(by_host.get(host, []))
        if host in seen:
            low, high, n = seen[host]
            tail = (high + 1, high_water) if high_water > high else None
            missing = sum(b - a + 1 for a, b in ranges) + (tail[1] - tail[0] + 1 if tail else 0)
            status = "complete" if not missing else f"{missing} missing"
            lines.append(f"{host}: seq {low}..{high}, {n} seen, {status}")
        else:
            tail = (0, high_water) if high_water >= 0 else None
            lines.append(f"{host}: no windows yet" + (f", {high_water + 1} missing" if tail else ""))
        lines += [f"  missing {a}" if a == b else f"  missing {a}..{b}" for a, b in ranges]
        if tail:
            a, b = tail
            lines.append(f"  missing tail {a}" + (f"..{b}" if b > a else "") + f" (the agent had numbered up to {b})")
        if heard_at is not None:
            at = heard_at if heard_at.tzinfo else heard_at.replace(tzinfo=UTC)
            if (now - at).total_seconds() > silent_after_s:
                lines.append(f"  silent since {at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC")
    if not lines:
        return "no usage from any agent yet"
    return "\n".join(lines)
