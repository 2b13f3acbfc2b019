"""Kafka message values -> one Avro object container that ClickHouse parses itself.

The fast path never decodes a window in Python. A message value is
``C3 01 | fingerprint | Avro body of a UsageBatch``; an Avro record is just its
fields one after another, so ``prefix + body`` is a valid ``IngestBatch`` record
when ``IngestBatch`` is the ``UsageBatch`` record with a few leading fields
(partition, offset, timestamps, the verified signer). Each message becomes one
block of an Avro object container file (count 1, size, object, sync marker): a
corrupt body cannot run into its neighbour, and ClickHouse's ``FORMAT Avro``
reads the container into the ``usage_ingest_v<N>`` table (one per writer schema
version), whose materialized views check every window and route it to
``usage_raw`` or ``usage_quarantine`` (see ``schema.py``).

Pure: bytes in, bytes out; no Kafka, no ClickHouse.
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

import fastavro

from gpumeter.errors import RecordError
from gpumeter.record import SOE_MAGIC, schema_json, schema_versions, strip_logical_types

SYNC = b"gpumeter:ingest1"  # 16 bytes; any fixed value works, it only delimits blocks
assert len(SYNC) == 16

# The fields the loader puts in front of each message body (name, Avro type, ClickHouse type).
PREFIX_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("gm_partition", "int", "Int32"),
    ("gm_offset", "long", "Int64"),
    ("gm_timestamp_ms", "long", "Int64"),  # Kafka message timestamp; <= 0 when absent
    ("gm_ingested_at_us", "long", "Int64"),  # the loader's clock
    ("gm_signer_host", "string", "String"),  # host bound to the verified key; '' when unchecked
    ("gm_signer_provider", "string", "String"),  # that host's provider; '' when unchecked
    ("gm_block", "string", "String"),  # the loader's block (``loader.block_digest``): ties rejections to it
    # the verified key's validity (epoch ms; -1: no bound, or unchecked): the views refuse a batch made outside it
    ("gm_key_from_ms", "long", "Int64"),
    ("gm_key_until_ms", "long", "Int64"),
)
# prefix fields added after ingest tables were first created: ``Ddl.ingest_prefix_columns`` adds them
ADDED_PREFIX_FIELDS = ("gm_block", "gm_key_from_ms", "gm_key_until_ms")


@dataclass(frozen=True, slots=True)
class WriterVersion:
    """One writer schema the pipeline can load: its fingerprint and plain (no logical types) JSON."""

    version: int
    fingerprint: bytes
    schema: dict[str, Any]

    @property
    def ingest_table(self) -> str:
        return f"usage_ingest_v{self.version}"


def shipped_versions() -> dict[bytes, WriterVersion]:
    """Every writer version in gpumeter/schemas, by fingerprint."""
    return {
        fp: WriterVersion(sv.version, fp, strip_logical_types(schema_json(sv.version)))
        for fp, sv in schema_versions().items()
    }


def zigzag(n: int) -> bytes:
    """Avro ``long``/``int`` encoding."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _avro_string(text: str) -> bytes:
    raw = text.encode()
    return zigzag(len(raw)) + raw


def ingest_schema(writer: WriterVersion) -> dict[str, Any]:
    """``IngestBatch``: the prefix fields, then the writer's UsageBatch fields unchanged."""
    batch = copy.deepcopy(writer.schema)
    namespace = batch.get("namespace", "")
    fields = batch["fields"]
    for field in fields:  # nested named types keep their full names under the new record
        typ = field["type"]
        if isinstance(typ, dict) and typ.get("type") == "array" and isinstance(typ["items"], dict):
            typ["items"].setdefault("namespace", namespace)
    prefix = [{"name": name, "type": avro} for name, avro, _ in PREFIX_FIELDS]
    return {"type": "record", "name": "IngestBatch", "namespace": "io.gpumeter.ingest", "fields": prefix + fields}


@cache
def _header(version: int, schema_json: str) -> bytes:
    meta = {"avro.schema": schema_json.encode(), "avro.codec": b"null"}
    out = bytearray(b"Obj\x01")
    out += zigzag(len(meta))
    for key, value in meta.items():
        out += _avro_string(key) + zigzag(len(value)) + value
    out += b"\x00" + SYNC
    return bytes(out)


def container_header(writer: WriterVersion) -> bytes:
    return _header(writer.version, json.dumps(ingest_schema(writer), sort_keys=True))


@dataclass(frozen=True, slots=True)
class Framed:
    """One verified message ready for the container."""

    offset: int
    timestamp_ms: int
    body: bytes  # the Avro body, after the 10-byte single-object header
    signer_host: str = ""
    signer_provider: str = ""
    key_from_ms: int = -1
    key_until_ms: int = -1


def container(
    writer: WriterVersion, partition: int, ingested_at_us: int, messages: Iterable[Framed], block: str = ""
) -> bytes:
    """An Avro object container with one Avro block per message; ``block`` names the loader's block."""
    parts = [container_header(writer)]
    head = zigzag(partition)
    now = zigzag(ingested_at_us)
    tail = _avro_string(block)
    one = zigzag(1)
    for m in messages:
        prefix = (
            head
            + zigzag(m.offset)
            + zigzag(m.timestamp_ms)
            + now
            + _avro_string(m.signer_host)
            + _avro_string(m.signer_provider)
            + tail
            + zigzag(m.key_from_ms)
            + zigzag(m.key_until_ms)
        )
        parts += (one, zigzag(len(prefix) + len(m.body)), prefix, m.body, SYNC)
    return b"".join(parts)


def split_value(value: bytes, known: dict[bytes, WriterVersion]) -> tuple[WriterVersion, bytes]:
    """(writer version, Avro body) of a message value; RecordError if the framing is wrong."""
    if len(value) < 10 or value[:2] != SOE_MAGIC:
        raise RecordError("not an Avro single-object message (bad magic)")
    fp = bytes(value[2:10])
    writer = known.get(fp)
    if writer is None:
        raise RecordError(f"unknown writer schema fingerprint {fp.hex()}")
    return writer, value[10:]


def _read_long(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise RecordError("corrupt Avro body: truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7


def _string_at(body: bytes, pos: int) -> tuple[int, int]:
    """(start, end) of the Avro string at ``pos``; RecordError if its length is impossible."""
    length, start = _read_long(body, pos)
    if length < 0 or start + length > len(body):
        raise RecordError("corrupt Avro body: bad string length")
    return start, start + length


def batch_host(body: bytes) -> bytes:
    """The ``host_id`` of a UsageBatch body (its first field), as bytes, without decoding the rest."""
    start, end = _string_at(body, 0)
    return body[start:end]


def window_count(body: bytes) -> int:
    """Windows in a UsageBatch body (host_id, agent_version, then the array), without decoding them.

    The agent and fastavro write the array as one block of items. A writer may also write blocks
    with a negative count, each followed by its size in bytes: those are skipped and counted. The
    items of a positive block cannot be skipped without decoding them, so counting stops there; the
    ingest views check the whole array's length again (``schema.WINDOW_CHECKS``).
    """
    pos = 0
    for _ in range(2):  # host_id, agent_version
        _, pos = _string_at(body, pos)
    total = 0
    while True:
        count, pos = _read_long(body, pos)
        if count >= 0:
            return total + count
        size, pos = _read_long(body, pos)
        if size < 0 or pos + size > len(body):
            raise RecordError("corrupt Avro body: bad array block size")
        total, pos = total - count, pos + size


def heartbeat_made_at(body: bytes) -> int | None:
    """``made_at`` of a v3+ body that carries no windows (a heartbeat): the fields after an empty
    windows array are high_water_seq then made_at. None when the array holds windows."""
    pos = 0
    for _ in range(2):  # host_id, agent_version
        _, pos = _string_at(body, pos)
    while True:
        count, pos = _read_long(body, pos)
        if count == 0:
            break
        if count > 0:
            return None
        size, pos = _read_long(body, pos)
        if size != 0:  # a block of windows
            return None
    _, pos = _read_long(body, pos)  # high_water_seq
    made_at, _ = _read_long(body, pos)
    return made_at


@cache
def _parsed(version: int, schema_json: str) -> Any:
    return fastavro.parse_schema(json.loads(schema_json))


def decode_body(writer: WriterVersion, body: bytes) -> dict[str, Any]:
    """Decode one body with its writer schema (the slow path's check); RecordError if it is not one."""
    stream = io.BytesIO(body)
    try:
        batch = fastavro.schemaless_reader(
            stream, _parsed(writer.version, json.dumps(writer.schema, sort_keys=True)), None
        )
    except Exception as exc:  # fastavro raises many types on corrupt input
        raise RecordError(f"corrupt Avro body: {type(exc).__name__}: {exc}") from exc
    if stream.tell() != len(body):
        raise RecordError(f"trailing bytes after Avro body ({len(body) - stream.tell()})")
    if not isinstance(batch, dict):
        raise RecordError("Avro body is not a UsageBatch record")
    return batch
