"""Drains the spool to Kafka in order, in its own thread, so sampling never waits on the network.

Per pass: 1. take the oldest batches (by first seq); 2. send each exactly as
spooled; 3. wait for the broker's acks=all answer; 4. delete only the batches
it acknowledged. Anything else stays spooled and is retried with exponential
backoff; a broker outage of hours only grows the spool (bounded, see spool.py).
A re-sent batch is byte-identical, so downstream sees at most a duplicate of
the same record_ids.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from agent.spool import Spool, SpoolError

log = logging.getLogger("gpumeter.agent.sender")
HEARTBEAT_S = 60.0  # with nothing else to send, a heartbeat at least this often (pipeline gaps: "silent since")


class FramedSink(Protocol):
    def send_framed(self, host_id: str, value: bytes, headers: list[tuple[str, bytes]], windows: int) -> None: ...

    def flush_each(self, timeout_s: float = 30.0) -> list[BaseException | None]: ...

    def close(self) -> None: ...


class SpoolSender:
    def __init__(
        self,
        spool: Spool,
        connect: Callable[[], FramedSink],
        batch_files: int = 50,
        flush_timeout_s: float = 15.0,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 10.0,
        heartbeat: Callable[[], tuple[str, bytes, list[tuple[str, bytes]]]] | None = None,
        heartbeat_s: float = HEARTBEAT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spool = spool
        self.heartbeat = heartbeat  # () -> (host_id, value, headers) of a heartbeat message
        self.heartbeat_s = heartbeat_s
        self.clock = clock
        self.heartbeats_sent = 0
        self._last_sent = clock()
        self.connect = connect
        self.batch_files = batch_files
        self.flush_timeout_s = flush_timeout_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.stop_event = threading.Event()
        self.send_errors = 0
        self.messages_sent = 0
        self.windows_sent = 0
        self.last_error: str | None = None
        self._sink: FramedSink | None = None
        self._thread: threading.Thread | None = None

    def drain_once(self) -> str:
        """One pass: 'idle' (nothing spooled), 'sent' (all acknowledged) or 'failed'."""
        entries = self.spool.pending(self.batch_files)
        if not entries:
            return "idle"
        sent = []
        try:
            if self._sink is None:
                self._sink = self.connect()
            for entry in entries:
                try:
                    value, headers, host_id = self.spool.read(entry)
                except (SpoolError, OSError, ValueError) as exc:
                    self.spool.quarantine_entry(entry, str(exc))
                    continue
                self._sink.send_framed(host_id, value, headers, entry.windows)
                sent.append(entry)
            results = self._sink.flush_each(self.flush_timeout_s)
        except Exception as exc:  # no broker, metadata timeout...: transient, the spool keeps everything
            self._failed(exc)
            return "failed"
        acked = [e for e, err in zip(sent, results, strict=True) if err is None]
        if acked:
            self._last_sent = self.clock()
        self.spool.ack(acked)
        self.messages_sent += len(acked)
        self.windows_sent += sum(e.windows for e in acked)
        errors = [err for err in results if err is not None]
        if errors:
            self._failed(errors[0], count=len(errors))
            return "failed"
        if self.last_error is not None:
            log.info("Kafka reachable again; spool draining (%d batch(es) left)", self.spool.depth_batches)
            self.last_error = None
        return "sent"

    def beat_once(self) -> str:
        """With the spool empty, a heartbeat if nothing went out for ``heartbeat_s``: 'idle' (none
        due), 'sent' or 'failed'."""
        if self.heartbeat is None or self.clock() - self._last_sent < self.heartbeat_s:
            return "idle"
        try:
            if self._sink is None:
                self._sink = self.connect()
            host_id, value, headers = self.heartbeat()
            self._sink.send_framed(host_id, value, headers, 0)
            errors = [err for err in self._sink.flush_each(self.flush_timeout_s) if err is not None]
            if errors:
                raise errors[0]
        except Exception as exc:  # as for a batch: transient, tried again at the next idle pass
            self._failed(exc)
            return "failed"
        self.heartbeats_sent += 1
        self._last_sent = self.clock()
        return "sent"

    def _failed(self, exc: BaseException, count: int = 1) -> None:
        self.send_errors += count
        message = f"{type(exc).__name__}: {exc}"
        if message != self.last_error:
            log.warning("send failed (%s); %d batch(es) stay spooled, retrying", message, self.spool.depth_batches)
        self.last_error = message
        sink, self._sink = self._sink, None
        if sink is not None:
            with contextlib.suppress(Exception):
                sink.close()

    def run(self, drain_grace_s: float = 5.0) -> None:
        delay = 0.0
        while not self.stop_event.is_set():
            self.spool.wakeup.clear()
            outcome = self.drain_once()
            if outcome == "idle" and self.beat_once() == "failed":
                outcome = "failed"
            if outcome == "sent":
                delay = 0.0
            elif outcome == "idle":
                self.spool.wakeup.wait(5.0)
            else:
                delay = min(self.backoff_max_s, max(self.backoff_min_s, delay * 2))
                self.stop_event.wait(delay)
        # stopping: send what is spooled while the broker answers, for at most drain_grace_s
        deadline = time.monotonic() + drain_grace_s
        while time.monotonic() < deadline and self.drain_once() == "sent":
            pass
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="spool-sender", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self.stop_event.set()
        self.spool.wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
