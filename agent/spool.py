"""The crash-safe on-disk spool: closed windows are durable here before anything sends them.

Layout under the spool directory::

    batches/<first_seq:016d>.batch   one Kafka message each, immutable once renamed into place
    quarantine/                      batch files that failed their checksum (kept, never sent)
    state.json                       next_seq and the newest spooled window end (fsync'd per close)
    checkpoint.json                  the open windows (rewritten every sample; fsync'd per close)

A batch file is ``MAGIC | u32 header length | header JSON | u32 value length |
value | u32 CRC-32 of everything before it``. The value is the exact Kafka
message value (Avro single-object encoding) and the header carries the
signature headers, so what is sent is byte-for-byte what was made durable.

Writing a batch (steps in this order, the step numbers are load-bearing):
1. write ``batches/<seq>.tmp``, fsync it; 2. rename it to ``.batch``, fsync the
directory - now the windows count as durable; 3. write ``state.json`` the same
way. A crash before 2 leaves a ``.tmp`` that is deleted at start (the windows
are still open in the previous checkpoint and close again, identically); after
2 the windows are on disk. Only ``ack()``, called for what the broker
acknowledged, deletes a batch file.

Full (``max_bytes``): new batches are refused, never older ones deleted. The
refused windows still consume sequence numbers (the pipeline sees the gap),
``windows_dropped`` counts them, every refusal is logged at ERROR and
``gpumeter agent check`` fails while the spool is full. See agent/README.md.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.windows import HostIdentity, WindowAccumulator
from gpumeter.errors import GpumeterError
from gpumeter.files import fsync_dir, write_atomic
from gpumeter.record import (
    MAX_WINDOWS_PER_BATCH,
    GpuWindow,
    SigningKey,
    UsageWindow,
    encode_batch,
    signature_headers,
    split_for_messages,
)

log = logging.getLogger("gpumeter.agent.spool")

MAGIC = b"GMSPOOL1"
DEFAULT_MAX_BYTES = 256 * 2**20
_U32 = struct.Struct("<I")


class SpoolError(GpumeterError):
    code = "spool"


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    path: Path
    first_seq: int
    last_seq: int
    windows: int
    window_end_max_ms: int
    created_ms: int
    size: int


def encode_file(header: dict[str, Any], value: bytes) -> bytes:
    h = json.dumps(header, sort_keys=True).encode()
    body = MAGIC + _U32.pack(len(h)) + h + _U32.pack(len(value)) + value
    return body + _U32.pack(zlib.crc32(body))


def decode_file(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, value); SpoolError for a torn or corrupt file."""
    if len(data) < len(MAGIC) + 12 or not data.startswith(MAGIC):
        raise SpoolError("not a spool batch (bad magic or too short)")
    body, (crc,) = data[:-4], _U32.unpack(data[-4:])
    if zlib.crc32(body) != crc:
        raise SpoolError("checksum mismatch (torn or corrupted write)")
    at = len(MAGIC)
    (hlen,) = _U32.unpack_from(body, at)
    header = json.loads(body[at + 4 : at + 4 + hlen])
    at += 4 + hlen
    (vlen,) = _U32.unpack_from(body, at)
    value = body[at + 4 : at + 4 + vlen]
    if len(value) != vlen or at + 4 + vlen != len(body):
        raise SpoolError("length mismatch")
    return header, value


class Spool:
    """A ``Sink`` (durable write) and a ``Checkpoint`` for the agent; ``pending``/``ack`` for the sender."""

    def __init__(
        self,
        root: Path,
        max_bytes: int = DEFAULT_MAX_BYTES,
        signing_key: tuple[str, SigningKey] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self.batches = root / "batches"
        self.quarantine = root / "quarantine"
        self.max_bytes = max_bytes
        self.signing_key = signing_key
        self.clock = clock
        self.windows_dropped = 0
        self.gpu_windows_dropped = 0
        self.quarantined = 0
        self.wakeup = threading.Event()
        self._lock = threading.Lock()
        for d in (self.batches, self.quarantine):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        state = self._read_json(root / "state.json") or {}
        self.next_seq = int(state.get("next_seq", 0))
        self.closed_through_ms = int(state.get("closed_through_ms", 0))
        self._entries: dict[Path, SpoolEntry] = {}
        self._recover()

    # --- start-up -------------------------------------------------------------
    def _recover(self) -> None:
        for tmp in self.batches.glob("*.tmp"):  # never renamed: never durable, still open in the checkpoint
            tmp.unlink()
        for path in sorted(self.batches.glob("*.batch")):
            try:
                header, _ = decode_file(path.read_bytes())
                entry = self._entry(path, header)
            except (SpoolError, ValueError, KeyError, OSError) as exc:
                self._quarantine(path, str(exc))
                continue
            self._entries[path] = entry
            self.next_seq = max(self.next_seq, entry.last_seq + 1)
            self.closed_through_ms = max(self.closed_through_ms, entry.window_end_max_ms)
        if self._entries:
            log.info("spool: %d batch(es), %d window(s) waiting to be sent", len(self._entries), self.depth_windows)

    def _quarantine(self, path: Path, why: str) -> None:
        self.quarantined += 1
        target = self.quarantine / path.name
        os.replace(path, target)
        fsync_dir(self.batches)
        log.error("spool: %s quarantined to %s: %s (its windows will not be sent)", path.name, target, why)

    @staticmethod
    def _entry(path: Path, header: dict[str, Any]) -> SpoolEntry:
        return SpoolEntry(
            path,
            int(header["first_seq"]),
            int(header["last_seq"]),
            int(header["windows"]),
            int(header["window_end_max_ms"]),
            int(header["created_ms"]),
            path.stat().st_size,
        )

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("spool: %s unreadable (%s); ignoring it", path, exc)
            return None
        return data if isinstance(data, dict) else None

    # --- Sink: closed windows become durable ------------------------------------
    def send(
        self,
        host_id: str,
        agent_version: str,
        windows: Sequence[UsageWindow],
        gpu_windows: Sequence[GpuWindow] = (),
    ) -> None:
        """Make closed windows and GPU windows durable, in messages of at most MAX_WINDOWS_PER_BATCH
        records (the two together, so each array stays inside the contract's limit)."""
        if not windows and not gpu_windows:
            return
        if len(windows) + len(gpu_windows) > MAX_WINDOWS_PER_BATCH:
            for chunk, gpu_chunk in split_for_messages(windows, gpu_windows):
                self.send(host_id, agent_version, chunk, gpu_chunk)
            return
        seqs = [int(w["seq"]) for w in (*windows, *gpu_windows)]
        first, last = min(seqs), max(seqs)
        end_ms = max(int(w["window_end"]) for w in (*windows, *gpu_windows))
        high_water = max(self.next_seq - 1, last)  # the highest seq numbered so far, refused ones too
        value = encode_batch(host_id, agent_version, windows, high_water_seq=high_water,
                             made_at_ms=int(self.clock() * 1000), gpu_windows=gpu_windows)  # fmt: skip
        headers = signature_headers(value, *self.signing_key) if self.signing_key else []
        header = {
            "first_seq": first,
            "last_seq": last,
            "windows": len(windows),
            "gpu_windows": len(gpu_windows),
            "window_end_max_ms": end_ms,
            "created_ms": int(self.clock() * 1000),
            "host_id": host_id,
            "headers": [[k, v.decode()] for k, v in headers],
        }
        data = encode_file(header, value)
        with self._lock:
            if self.depth_bytes + len(data) > self.max_bytes:
                self.windows_dropped += len(windows)
                self.gpu_windows_dropped += len(gpu_windows)
                log.error(
                    "spool FULL (%d of %d bytes): %d closed window(s) and %d GPU window(s) seq %d-%d REFUSED and lost; "
                    "%d window(s) and %d GPU window(s) refused so far. Fix the Kafka connection or raise "
                    "spool_max_bytes.",
                    self.depth_bytes,
                    self.max_bytes,
                    len(windows),
                    len(gpu_windows),
                    first,
                    last,
                    self.windows_dropped,
                    self.gpu_windows_dropped,
                )
            else:
                path = self.batches / f"{first:016d}.batch"
                write_atomic(path, data, sync=True)  # steps 1-2: fsync file, rename, fsync dir
                self._entries[path] = self._entry(path, header)
            self.next_seq = max(self.next_seq, last + 1)
            self.closed_through_ms = max(self.closed_through_ms, end_ms)
            state = {"next_seq": self.next_seq, "closed_through_ms": self.closed_through_ms}
            write_atomic(self.root / "state.json", json.dumps(state).encode(), sync=True)  # step 3
        self.wakeup.set()

    def heartbeat(self, host_id: str, agent_version: str) -> tuple[bytes, list[tuple[str, bytes]]]:
        """A message of no windows, signed like a batch, carrying the highest seq numbered so far:
        sent when the spool is empty, it says that every window up to it was sent (or refused,
        and then logged), so the pipeline sees a lost tail and a live but idle agent."""
        value = encode_batch(host_id, agent_version, [], high_water_seq=self.next_seq - 1,
                             made_at_ms=int(self.clock() * 1000))  # fmt: skip
        return value, signature_headers(value, *self.signing_key) if self.signing_key else []

    # --- Checkpoint: open windows across restarts ------------------------------------
    def load(self) -> dict[str, Any] | None:
        """The saved open windows, minus any already closed into a batch; next_seq never goes back."""
        data = self._read_json(self.root / "checkpoint.json")
        if data is None:
            return None if self.next_seq == 0 else {"next_seq": self.next_seq}
        acc = WindowAccumulator.restore(HostIdentity("", ""), data)
        stale = acc.drop_open_before(self.closed_through_ms // 1000)
        if stale:
            log.info("spool: %d open window(s) in the checkpoint were already spooled; not reopened", stale)
        snap = acc.snapshot()
        snap["next_seq"] = max(int(snap["next_seq"]), self.next_seq)
        return snap

    def save(self, snapshot: dict[str, Any], sync: bool) -> None:
        # Without fsync the rename still survives a kill -9 (the page cache outlives the process);
        # fsync'd whenever windows closed, so a power loss costs at most the open window.
        write_atomic(self.root / "checkpoint.json", json.dumps(snapshot).encode(), sync=sync)

    # --- the sender's side ----------------------------------------------------------
    def pending(self, limit: int = 50) -> list[SpoolEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.first_seq)[:limit]

    def read(self, entry: SpoolEntry) -> tuple[bytes, list[tuple[str, bytes]], str]:
        """(value, headers, host_id) exactly as made durable."""
        header, value = decode_file(entry.path.read_bytes())
        headers = [(str(k), str(v).encode()) for k, v in header["headers"]]
        return value, headers, str(header["host_id"])

    def ack(self, entries: Sequence[SpoolEntry]) -> None:
        """The broker acknowledged these (acks=all): only now delete them."""
        with self._lock:
            for e in entries:
                e.path.unlink(missing_ok=True)
                self._entries.pop(e.path, None)
            fsync_dir(self.batches)

    def quarantine_entry(self, entry: SpoolEntry, why: str) -> None:
        with self._lock:
            if self._entries.pop(entry.path, None) is not None:
                self._quarantine(entry.path, why)

    # --- depth, for metrics and `agent check` ----------------------------------------
    @property
    def depth_batches(self) -> int:
        return len(self._entries)

    @property
    def depth_windows(self) -> int:
        return sum(e.windows for e in list(self._entries.values()))

    @property
    def depth_bytes(self) -> int:
        return sum(e.size for e in list(self._entries.values()))

    def oldest_age_s(self) -> float:
        entries = list(self._entries.values())
        if not entries:
            return 0.0
        return max(0.0, self.clock() - min(e.created_ms for e in entries) / 1000)

    @property
    def full(self) -> bool:
        return self.depth_bytes >= self.max_bytes * 0.99
