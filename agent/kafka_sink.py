"""Sends framed usage batches to Kafka with acks=all. The only module here that imports kafka."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

from kafka import KafkaProducer

from gpumeter.errors import GpumeterError
from gpumeter.record import (
    MAX_WINDOWS_PER_BATCH,
    GpuWindow,
    SigningKey,
    UsageWindow,
    encode_batch,
    signature_headers,
    split_for_messages,
)

MAX_WINDOWS_PER_MESSAGE = MAX_WINDOWS_PER_BATCH


class SendError(GpumeterError):
    code = "send_failed"


class KafkaSink:
    def __init__(
        self,
        bootstrap: str,
        topic: str,
        signing_key: tuple[str, SigningKey] | None = None,
        host_keys: Mapping[str, tuple[str, SigningKey]] | None = None,
        **producer_config: Any,
    ) -> None:
        config: dict[str, Any] = {
            "acks": "all",
            "linger_ms": 20,
            "retries": 5,
            "max_in_flight_requests_per_connection": 1,  # keep a host's batches in order
            "request_timeout_ms": 15_000,
        }
        config.update(producer_config)
        self.topic = topic
        self.signing_key = signing_key
        self.host_keys = dict(host_keys or {})  # one producer for several hosts (the demo): each its own key
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, **config)
        self._pending: list[Any] = []
        self.messages_sent = 0
        self.windows_sent = 0

    def send(
        self,
        host_id: str,
        agent_version: str,
        windows: Sequence[UsageWindow],
        gpu_windows: Sequence[GpuWindow] = (),
    ) -> None:
        """Queue windows and GPU windows, in messages of at most MAX_WINDOWS_PER_MESSAGE records."""
        for chunk, gpu_chunk in split_for_messages(windows, gpu_windows, MAX_WINDOWS_PER_MESSAGE):
            value = encode_batch(
                host_id, agent_version, chunk, made_at_ms=int(time.time() * 1000), gpu_windows=gpu_chunk
            )
            key = self.host_keys.get(host_id, self.signing_key)
            headers = signature_headers(value, *key) if key else []
            fut = self._producer.send(self.topic, key=host_id.encode(), value=value, headers=headers)
            self._pending.append((fut, len(chunk)))

    def send_framed(self, host_id: str, value: bytes, headers: list[tuple[str, bytes]], windows: int) -> None:
        """Queue one message exactly as spooled (value and signature headers already made)."""
        fut = self._producer.send(self.topic, key=host_id.encode(), value=value, headers=headers)
        self._pending.append((fut, windows))

    def flush_each(self, timeout_s: float = 30.0) -> list[BaseException | None]:
        """Wait for every queued message; per message in send order: None if acknowledged, else why not."""
        with contextlib.suppress(Exception):  # a flush timeout: the futures below say which are not done
            self._producer.flush(timeout=timeout_s)
        out: list[BaseException | None] = []
        for fut, n in self._pending:
            exc = fut.exception if fut.is_done else TimeoutError("not acknowledged in time")
            if exc is None:
                self.messages_sent += 1
                self.windows_sent += n
            out.append(exc)
        self._pending = []
        return out

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until the broker acknowledged everything queued; SendError if anything failed."""
        self._producer.flush(timeout=timeout_s)
        failed = 0
        first: BaseException | None = None
        for fut, n in self._pending:
            exc = fut.exception if fut.is_done else TimeoutError("not acknowledged in time")
            if exc is not None:
                failed += n
                first = first or exc
            else:
                self.messages_sent += 1
                self.windows_sent += n
        self._pending = []
        if failed:
            raise SendError(f"{failed} window(s) not acknowledged by Kafka: {first}")

    def close(self) -> None:
        self._producer.close(timeout=10)
