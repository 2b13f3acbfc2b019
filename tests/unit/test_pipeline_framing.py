"""The container the loader hands ClickHouse is a valid Avro file whose records are prefix + batch."""

from __future__ import annotations

import io

import fastavro
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpumeter.errors import RecordError
from gpumeter.record import CURRENT_VERSION, encode_batch, record_id
from pipeline.framing import Framed, container, decode_body, shipped_versions, split_value, window_count, zigzag


def windows(n: int) -> list[dict[str, object]]:
    return [
        {"record_id": record_id("h", "G", "F", i * 60_000), "seq": i, "provider_id": "P", "host_id": "h",
         "gpu_uuid": "G", "gpu_class": "H100-80G", "firm_id": "F", "window_start": i * 60_000,
         "window_end": (i + 1) * 60_000, "allocated_seconds": 60, "busy_seconds": None,
         "energy_joules": 1.5, "samples_taken": 60, "samples_missed": 0, "signature": None}
        for i in range(n)
    ]  # fmt: skip


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_zigzag_is_avro_long(n: int) -> None:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, {"type": "long"}, n)
    assert zigzag(n) == buf.getvalue()


def test_container_reads_back_as_prefix_plus_batch() -> None:
    known = shipped_versions()
    framed = []
    for offset, n in ((10, 3), (11, 0), (12, 500)):
        writer, body = split_value(encode_batch("h", "v", windows(n)), known)
        framed.append(Framed(offset, 1234 + offset, body, "h", "P"))
    records = list(fastavro.reader(io.BytesIO(container(writer, 2, 99, framed))))
    assert [(r["gm_partition"], r["gm_offset"], r["gm_timestamp_ms"], r["gm_ingested_at_us"]) for r in records] == [
        (2, 10, 1244, 99), (2, 11, 1245, 99), (2, 12, 1246, 99)]  # fmt: skip
    assert [len(r["windows"]) for r in records] == [3, 0, 500]
    assert records[2]["windows"][499] == windows(500)[499]
    assert records[0]["gm_signer_host"] == "h" and records[0]["gm_signer_provider"] == "P"


@pytest.mark.parametrize("n", [0, 1, 63, 64, 500])
def test_window_count_reads_the_array_header(n: int) -> None:
    _, body = split_value(encode_batch("host-with-a-long-name", "1.0", windows(n)), shipped_versions())
    assert window_count(body) == n


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", "not an Avro single-object message (bad magic)"),
        (b"\xc3\x01\x00", "not an Avro single-object message (bad magic)"),
        (b"\xc3\x02" + b"\x00" * 20, "not an Avro single-object message (bad magic)"),
        (b"\xc3\x01" + b"\x01" * 8 + b"zz", "unknown writer schema fingerprint 0101010101010101"),
    ],
    ids=["empty", "short", "magic", "fingerprint"],
)
def test_split_value_rejects(value: bytes, reason: str) -> None:
    with pytest.raises(RecordError) as err:
        split_value(value, shipped_versions())
    assert str(err.value) == reason


def test_decode_body_rejects_truncated_and_trailing() -> None:
    writer, body = split_value(encode_batch("h", "v", windows(2)), shipped_versions())
    assert len(decode_body(writer, body)["windows"]) == 2
    with pytest.raises(RecordError, match="corrupt Avro body"):
        decode_body(writer, body[:-7])
    with pytest.raises(RecordError) as err:
        decode_body(writer, body + b"\x00")
    assert str(err.value) == "trailing bytes after Avro body (1)"


def test_window_count_rejects_a_truncated_header() -> None:
    with pytest.raises(RecordError) as err:
        window_count(b"\x80")
    assert str(err.value) == "corrupt Avro body: truncated varint"


def blocked_body(n: int, sizes: list[int], negative: bool) -> bytes:
    """The body of a batch of ``windows(n)`` with its array written as blocks of ``sizes`` items;
    ``negative``: each block's count negated and followed by its size in bytes (Avro allows both)."""
    versions = shipped_versions()

    def body(ws: list[dict[str, object]]) -> bytes:
        return split_value(encode_batch("h", "t", ws, high_water_seq=-1), versions)[1]  # type: ignore[arg-type]

    strings = zigzag(1) + b"h" + zigzag(1) + b"t"  # host_id, agent_version; the array follows
    trailer = body([])[len(strings) + 1 :]  # the batch fields after the array
    items = [body([w])[len(strings) + 1 : -1 - len(trailer)] for w in windows(n)]
    out, done = bytearray(strings), 0
    for size in sizes:
        chunk = b"".join(items[done : done + size])
        out += zigzag(-size) + zigzag(len(chunk)) if negative else zigzag(size)
        out += chunk
        done += size
    return bytes(out + b"\x00" + trailer)


@pytest.mark.parametrize("negative", [False, True])
def test_window_count_counts_every_block_it_can_skip(negative: bool) -> None:
    body = blocked_body(7, [3, 4], negative)
    writer = next(w for w in shipped_versions().values() if w.version == CURRENT_VERSION)
    assert len(decode_body(writer, body)["windows"]) == 7
    # negative blocks carry their size, so each is skipped and counted; a positive block's items cannot
    # be skipped without decoding them, so the count stops after the first (the views see the rest)
    assert window_count(body) == (7 if negative else 3)
