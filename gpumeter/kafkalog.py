"""Reaching Kafka at start, said once in plain words.

With the broker down, kafka-python logs four lines per attempt (connection failed, connection
lost, bootstrap failed with its backoff, not ready) every few seconds, naming the broker
``bootstrap-0``, and then raises after its bootstrap timeout. ``until_connected`` instead checks
that a bootstrap server accepts TCP connections before it builds the client (a client that fails
to bootstrap leaves a thread and sockets behind), says ``cannot reach Kafka at HOST:PORT
(reason); retrying in N s`` once per attempt, and waits longer each time, until it connects or
the process is told to stop. While it connects, ``ConnectionNoise`` (on the log handlers) drops
kafka-python's connection records; authentication, TLS and every record once connected pass.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("gpumeter.kafka")

NOISY = ("kafka.net", "kafka.conn", "kafka.client")
NOISE = re.compile(
    r"ECONNREFUSED|Connection (?:failed|lost|refused)|not ready|KafkaConnectionError|connect attempt|"
    r"Unable to connect|Unable to bootstrap|Bootstrap failed|DNS lookup failed",
    re.IGNORECASE,
)
NEVER_NOISE = re.compile(r"sasl|authenticat|authoriz|ssl|tls|certificate|handshake", re.IGNORECASE)


class ConnectionNoise(logging.Filter):
    """Drops kafka-python's connection records while ``connecting`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.connecting = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.connecting or not record.name.startswith(NOISY):
            return True
        message = record.getMessage()
        return bool(NEVER_NOISE.search(message)) or not NOISE.search(message)


def unreachable(bootstrap: str, timeout_s: float = 5.0) -> str | None:
    """Why no bootstrap server of ``bootstrap`` ("h1:p1,h2:p2") accepts a TCP connection; None if one does."""
    reasons = []
    for server in (s.strip() for s in bootstrap.split(",") if s.strip()):
        host, _, port = server.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or server, int(port or 9092)), timeout=timeout_s):
                return None
        except (OSError, ValueError) as exc:
            reasons.append(_reason(exc))
    return "; ".join(dict.fromkeys(reasons)) or "no bootstrap server given"


def until_connected(
    connect: Callable[[], T],
    bootstrap: str,
    should_stop: Callable[[], bool],
    sleep: Callable[[float], None] = time.sleep,
    max_wait_s: float = 60.0,
    probe: Callable[[str], str | None] = unreachable,
) -> T | None:
    """``connect()`` once ``probe`` finds a bootstrap server listening (waits 5, 10, 20 ...
    ``max_wait_s`` seconds between tries, one plain line each); ``None`` if told to stop first."""
    from kafka.errors import KafkaConnectionError, KafkaTimeoutError

    noise = ConnectionNoise()
    handlers = logging.getLogger().handlers
    for handler in handlers:
        handler.addFilter(noise)
    wait = 5.0
    try:
        while not should_stop():
            why = probe(bootstrap)
            if why is None:
                noise.connecting = True
                try:
                    return connect()
                except (KafkaConnectionError, KafkaTimeoutError) as exc:
                    why = _reason(exc)
                finally:
                    noise.connecting = False
            log.warning("cannot reach Kafka at %s (%s); retrying in %.0f s", bootstrap, why, wait)
            waited = 0.0
            while waited < wait and not should_stop():
                sleep(0.5)
                waited += 0.5
            wait = min(wait * 2, max_wait_s)
        return None
    finally:
        for handler in handlers:
            handler.removeFilter(noise)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"unknown host: {exc.strerror}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = re.sub(r"^(?:\w+(?:Error|Exception): )+", "", str(exc))  # kafka-python repeats the class name
    return (text[0].lower() + text[1:]) if text else type(exc).__name__
