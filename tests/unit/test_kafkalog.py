"""Reaching Kafka at start: one plain line per attempt, backoff, kafka-python's noise dropped only
while connecting."""

from __future__ import annotations

import logging
import socket

import pytest
from kafka.errors import KafkaTimeoutError

from gpumeter.kafkalog import ConnectionNoise, unreachable, until_connected


def record(name: str, msg: str, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, (), None)


def test_retries_back_off_with_one_plain_line_each_until_connected(caplog: pytest.LogCaptureFixture) -> None:
    probes = iter(["connection refused", "connection refused", None, None])
    tries = iter([KafkaTimeoutError("KafkaTimeoutError: Unable to bootstrap from h:1"), "client"])
    slept: list[float] = []

    def connect() -> str:
        got = next(tries)
        if isinstance(got, Exception):
            raise got
        return got

    with caplog.at_level(logging.WARNING, logger="gpumeter.kafka"):
        got = until_connected(connect, "h:1", lambda: False, sleep=slept.append, probe=lambda _: next(probes))
    assert got == "client"
    assert [r.getMessage() for r in caplog.records] == [
        "cannot reach Kafka at h:1 (connection refused); retrying in 5 s",
        "cannot reach Kafka at h:1 (connection refused); retrying in 10 s",
        "cannot reach Kafka at h:1 (unable to bootstrap from h:1); retrying in 20 s",
    ]
    assert sum(slept) == 5 + 10 + 20


def test_a_stop_request_ends_the_wait() -> None:
    asked = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) > 3

    assert until_connected(lambda: "client", "h:1", should_stop, sleep=lambda _: None,
                           probe=lambda _: "connection refused") is None  # fmt: skip


def test_the_noise_filter_drops_connection_records_only_while_connecting_and_never_auth_errors() -> None:
    noise = ConnectionNoise()
    refused = record("kafka.net.manager", "Connection failed: KafkaConnectionError: 111 ECONNREFUSED")
    sasl = record("kafka.net.connection", "Connection failed: [Error 58] SaslAuthenticationFailedError: bad password")
    other = record("kafka.coordinator", "Heartbeat failed: not ready")
    assert noise.filter(refused) and noise.filter(sasl)  # not connecting: everything passes
    noise.connecting = True
    assert not noise.filter(refused)
    assert noise.filter(sasl) and noise.filter(other)


def test_unreachable_says_why_and_finds_a_listening_server() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            dead = closed.getsockname()[1]
        assert unreachable(f"127.0.0.1:{dead}") == "connection refused"
        assert unreachable(f"127.0.0.1:{dead}, 127.0.0.1:{port}") is None
