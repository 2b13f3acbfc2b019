"""The record_id ranges of the re-delivery search cover every string exactly once.

A record_id in no range would never be deduplicated (billed twice); one in two ranges
would have its deliveries split, each range seeing only some of them. ClickHouse
compares Strings bytewise, which for UTF-8 is the code-point order Python uses.
"""

from __future__ import annotations

import string

from hypothesis import given
from hypothesis import strategies as st

from billing.clickhouse_usage import id_range_bounds, id_ranges

ids = st.one_of(
    st.text(alphabet="0123456789abcdef", min_size=32, max_size=32),  # the agent's record ids
    st.text(alphabet=string.printable, max_size=40),  # what an import may carry
    st.text(max_size=10),
)


@given(ids, st.integers(0, 10**12), st.integers(1, 10**9))
def test_every_string_is_in_exactly_one_range(record_id: str, rows: int, rows_per_range: int) -> None:
    bounds = id_range_bounds(rows, rows_per_range)
    holding = [(lo, hi) for lo, hi in bounds if (lo is None or lo <= record_id) and (hi is None or record_id < hi)]
    assert len(holding) == 1


def test_ranges_split_the_hex_space_evenly_and_as_sql() -> None:
    assert id_ranges(10) == ["1"]
    assert id_ranges(100_000_000, 25_000_000) == [
        "record_id < '40'",
        "record_id >= '40' AND record_id < '80'",
        "record_id >= '80' AND record_id < 'c0'",
        "record_id >= 'c0'",
    ]
    assert len(id_range_bounds(10**15, 1)) == 256  # never more than one range per leading byte
