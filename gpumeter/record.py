"""The usage-record contract: Avro schemas, the Kafka framing, record ids, signatures.

Framing (see CONTRACT.md for the why):

- one Kafka message = one ``UsageBatch`` of windows from one host; key = host_id,
  so one host's windows stay ordered in one partition;
- value = Avro single-object encoding: ``C3 01`` + the writer schema's 8-byte
  CRC-64-AVRO fingerprint (little-endian) + the Avro binary body. A reader keeps
  every schema version ever shipped (``schemas/usage_batch.v*.avsc``) and resolves
  the writer's version to the current reader schema, so old and new agents mix;
- headers ``gm-key-id`` and ``gm-sig``: the host key's id and the hex signature
  of the whole value bytes: Ed25519 (the default: the agent holds the private
  key, the pipeline only the public one) or, for hosts set up before 0.4,
  HMAC-SHA256 under a shared secret. The key id says which; no header does.

Timestamps cross the wire as ``timestamp-millis`` longs (UTC); this module keeps
them as integer milliseconds so decoding stays cheap.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import hmac
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, TypedDict, cast

import fastavro
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from fastavro.schema import fingerprint, to_parsing_canonical_form

from gpumeter.errors import RecordError

SOE_MAGIC = b"\xc3\x01"
HEADER_KEY_ID = "gm-key-id"
HEADER_SIG = "gm-sig"
UNATTRIBUTED = "unattributed"
# a firm id as agents name it (and the pipeline enforces): letters and digits, then also . _ -, at most 64
FIRM_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
CURRENT_VERSION = 4
# Limits of one message (CONTRACT.md): agents never send more; the pipeline quarantines a message over them.
MAX_WINDOWS_PER_BATCH = 500
MAX_VALUE_BYTES = 1_048_576  # Kafka's default max.message.bytes is this plus 12 bytes of overhead


class UsageWindow(TypedDict):
    """One usage window as it crosses the wire (the ``UsageWindow`` record of the current schema).

    Timestamps are UTC epoch milliseconds; ``window_end`` is exclusive. The fields an older writer
    lacks (``samples_taken``, ``samples_missed``; ``busy_seconds`` and ``energy_joules`` may be
    unknown) are ``None``.
    """

    record_id: str
    seq: int
    provider_id: str
    host_id: str
    gpu_uuid: str
    gpu_class: str
    firm_id: str
    window_start: int
    window_end: int
    allocated_seconds: int
    busy_seconds: float | None
    energy_joules: float | None
    samples_taken: int | None
    samples_missed: int | None
    signature: bytes | None


class GpuWindow(TypedDict):
    """(v4) One GPU's window, every second accounted once (CONTRACT.md, "The GPU window"):
    ``allocated + unattributed + idle + unread + unsampled`` seconds = the window's length."""

    seq: int
    provider_id: str
    host_id: str
    gpu_uuid: str
    gpu_class: str
    window_start: int
    window_end: int
    allocated_seconds: int
    unattributed_seconds: int
    idle_seconds: int
    unread_seconds: int
    unsampled_seconds: int
    usage_windows: int


GPU_WINDOW_PARTS = ("allocated_seconds", "unattributed_seconds", "idle_seconds", "unread_seconds", "unsampled_seconds")


class UsageBatch(TypedDict):
    """One Kafka message: the windows one host sends together, or none (a heartbeat). From writers
    before v3, ``high_water_seq`` reads as -1 and ``made_at`` as 0; before v4, ``gpu_windows`` as []."""

    host_id: str
    agent_version: str
    windows: list[UsageWindow]
    high_water_seq: int
    made_at: int
    gpu_windows: list[GpuWindow]


@dataclass(frozen=True, slots=True)
class SchemaVersion:
    version: int
    fingerprint: bytes  # 8 bytes, little-endian CRC-64-AVRO of the parsing canonical form


def schema_json(version: int) -> dict[str, Any]:
    """The shipped Avro schema of writer ``version`` as JSON (FileNotFoundError past the last one)."""
    text = resources.files("gpumeter.schemas").joinpath(f"usage_batch.v{version}.avsc").read_text()
    data: dict[str, Any] = json.loads(text)
    return data


def strip_logical_types(node: Any) -> Any:
    """Same schema without logicalType: timestamps decode to int ms, not datetime."""
    if isinstance(node, dict):
        return {k: strip_logical_types(v) for k, v in node.items() if k != "logicalType"}
    if isinstance(node, list):
        return [strip_logical_types(v) for v in node]
    return node


@cache
def schema_versions() -> dict[bytes, SchemaVersion]:
    """Every writer schema this build can read, by fingerprint."""
    out: dict[bytes, SchemaVersion] = {}
    version = 1
    while True:
        try:
            raw = schema_json(version)
        except FileNotFoundError:
            break
        parsed = fastavro.parse_schema(copy.deepcopy(raw))
        fp_hex = fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO")
        fp = int(fp_hex, 16).to_bytes(8, "little")
        out[fp] = SchemaVersion(version, fp)
        version += 1
    return out


@cache
def _writer_for(version: int) -> SchemaVersion:
    for sv in schema_versions().values():
        if sv.version == version:
            return sv
    raise RecordError(f"no usage schema version {version}")


@cache
def _reader_schema() -> Any:
    return fastavro.parse_schema(strip_logical_types(schema_json(CURRENT_VERSION)))


@cache
def plain_writer(fp: bytes) -> Any:
    """The parsed writer schema of fingerprint ``fp``, timestamps as int milliseconds."""
    sv = schema_versions()[fp]
    return fastavro.parse_schema(strip_logical_types(schema_json(sv.version)))


def record_id(host_id: str, gpu_uuid: str, firm_id: str, window_start_ms: int) -> str:
    """Deterministic id of a (host, GPU, firm, window): a re-emitted window dedups downstream."""
    material = f"{host_id}\x1f{gpu_uuid}\x1f{firm_id}\x1f{window_start_ms}".encode()
    return hashlib.sha256(material).hexdigest()[:32]


def encode_batch(
    host_id: str,
    agent_version: str,
    windows: Sequence[UsageWindow],
    version: int = CURRENT_VERSION,
    high_water_seq: int | None = None,
    made_at_ms: int = 0,
    gpu_windows: Sequence[GpuWindow] = (),
) -> bytes:
    """Frame windows as one Kafka message value (single-object encoding). ``high_water_seq``: the
    highest seq the agent has numbered (default: the highest in ``windows`` and ``gpu_windows``, -1
    if none); it and ``made_at_ms`` are written from v3 on, ``gpu_windows`` from v4 on (an older
    version refuses them rather than drop them)."""
    sv = _writer_for(version)
    buf = io.BytesIO()
    buf.write(SOE_MAGIC)
    buf.write(sv.fingerprint)
    batch: dict[str, Any] = {"host_id": host_id, "agent_version": agent_version, "windows": list(windows)}
    if gpu_windows and version < 4:
        raise RecordError(f"schema version {version} cannot carry GPU windows")
    if version >= 3:
        seqs = [int(w["seq"]) for w in (*windows, *gpu_windows)]
        high = max(seqs, default=-1) if high_water_seq is None else high_water_seq
        batch.update(high_water_seq=high, made_at=made_at_ms)
    if version >= 4:
        batch["gpu_windows"] = list(gpu_windows)
    fastavro.schemaless_writer(buf, plain_writer(sv.fingerprint), batch)
    return buf.getvalue()


def split_for_messages(
    windows: Sequence[UsageWindow], gpu_windows: Sequence[GpuWindow], limit: int = MAX_WINDOWS_PER_BATCH
) -> list[tuple[list[UsageWindow], list[GpuWindow]]]:
    """Windows and GPU windows in messages of at most ``limit`` records in all, each message a run
    of seqs, oldest first (so each array stays inside the contract's limit)."""
    if not windows and not gpu_windows:
        return []
    if len(windows) + len(gpu_windows) <= limit:
        return [(list(windows), list(gpu_windows))]
    records: list[tuple[int, UsageWindow | None, GpuWindow | None]] = [
        *((int(w["seq"]), w, None) for w in windows),
        *((int(g["seq"]), None, g) for g in gpu_windows),
    ]
    records.sort(key=lambda r: r[0])
    chunks = [records[i : i + limit] for i in range(0, len(records), limit)]
    return [([w for _, w, _ in c if w is not None], [g for _, _, g in c if g is not None]) for c in chunks]


def decode_batch(value: bytes) -> UsageBatch:
    """Decode one message value to the current reader schema; RecordError if it is not one."""
    if len(value) < 10 or value[:2] != SOE_MAGIC:
        raise RecordError("not an Avro single-object message (bad magic)")
    fp = bytes(value[2:10])
    if fp not in schema_versions():
        raise RecordError(f"unknown writer schema fingerprint {fp.hex()}")
    body = io.BytesIO(value[10:])
    try:
        batch = fastavro.schemaless_reader(body, plain_writer(fp), _reader_schema())
    except Exception as exc:  # fastavro raises many types on corrupt input
        raise RecordError(f"corrupt Avro body: {type(exc).__name__}: {exc}") from exc
    if body.tell() != len(value) - 10:
        raise RecordError(f"trailing bytes after Avro body ({len(value) - 10 - body.tell()})")
    if not isinstance(batch, dict):
        raise RecordError("Avro body is not a UsageBatch record")
    return cast(UsageBatch, batch)


# What signs: an Ed25519 private key, or an HMAC secret (bytes). What verifies: the Ed25519 public
# key, or the same secret.
SigningKey = Ed25519PrivateKey | bytes
VerifyingKey = Ed25519PublicKey | bytes


def public_key_text(key: Ed25519PublicKey) -> str:
    """How a public key is written (the registry, ``agent keygen``): base64 of its 32 raw bytes."""
    return base64.b64encode(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def sign(value: bytes, key: SigningKey) -> str:
    """The ``gm-sig`` of a value: hex Ed25519 signature (64 bytes), or hex HMAC-SHA256 (32 bytes)."""
    if isinstance(key, bytes):
        return hmac.new(key, value, hashlib.sha256).hexdigest()
    return key.sign(value).hex()


def signature_headers(value: bytes, key_id: str, key: SigningKey) -> list[tuple[str, bytes]]:
    return [(HEADER_KEY_ID, key_id.encode()), (HEADER_SIG, sign(value, key).encode())]


def signed_key_id(headers: Iterable[tuple[str, bytes]]) -> tuple[str, bytes, str]:
    """(key id, signature header, the key id as a reason may show it) of a message; RecordError if unsigned."""
    found = dict(headers)
    key_id_raw, sig_raw = found.get(HEADER_KEY_ID), found.get(HEADER_SIG)
    if key_id_raw is None or sig_raw is None:
        raise RecordError("unsigned batch")
    key_id = key_id_raw.decode(errors="replace")
    # the header's bytes are the sender's: a reason (and the dead-letter header made from it) shows 64
    shown = key_id if len(key_id) <= 64 else f"{key_id[:64]}... ({len(key_id_raw)} bytes)"
    return key_id, sig_raw, shown


def check_signature(value: bytes, sig_raw: bytes, key: VerifyingKey, shown: str) -> None:
    """RecordError unless ``sig_raw`` (the ``gm-sig`` header) is the signature of ``value`` under ``key``."""
    if isinstance(key, bytes):
        if not hmac.compare_digest(sign(value, key).encode(), sig_raw):
            raise RecordError(f"bad signature for key id {shown!r}")
        return
    try:
        key.verify(binascii.unhexlify(sig_raw), value)
    except (InvalidSignature, binascii.Error, ValueError):
        raise RecordError(f"bad signature for key id {shown!r}") from None


def verify(value: bytes, headers: Iterable[tuple[str, bytes]], keys: dict[str, VerifyingKey]) -> str:
    """Check the batch signature; return the key id, or raise RecordError saying why not."""
    key_id, sig_raw, shown = signed_key_id(headers)
    key = keys.get(key_id)
    if key is None:
        raise RecordError(f"unknown signing key id {shown!r}")
    check_signature(value, sig_raw, key, shown)
    return key_id
