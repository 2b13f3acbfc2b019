"""One value of the billing store's ``meta`` table, read without the billing package.

The usage commands (pipeline) show days in the billing time zone, which the billing store
keeps (``meta``: ``timezone``, set by the rate card). The pipeline never depends on billing,
so this reads that one table directly, read only: no schema made, no lock waited on.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def peek_meta(url: str, key: str) -> str | None:
    """``meta[key]`` of the billing store at ``url`` (``sqlite:///PATH`` or ``postgresql://...``);
    ``None`` for a store that does not exist or cannot say (locked, unreachable, no driver)."""
    try:
        if url.startswith("sqlite:///"):
            path = Path(url[len("sqlite:///") - 1 :] if url.startswith("sqlite:////") else url[10:])
            if not path.exists():
                return None
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=1)
            try:
                row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            finally:
                conn.close()
        elif url.startswith(("postgresql://", "postgres://")):
            import psycopg

            with psycopg.connect(url, connect_timeout=5) as pg:
                row = pg.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
        else:
            return None
    except Exception:  # no such table, locked, unreachable, no driver: it cannot say
        return None
    return str(row[0]) if row else None
