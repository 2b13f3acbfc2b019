"""Test infrastructure: a real Kafka-protocol broker and real ClickHouse.

- Kafka: a Tansu broker started once per session on a free loopback port, or the
  broker named by ``GPUMETER_TEST_KAFKA_BOOTSTRAP`` (Apache Kafka, Redpanda...).
  Each test gets its own topic with a random suffix.
- ClickHouse: the embedded chDB engine (one data path per process, the engine's
  own limit) with a fresh database per test, or the server named by
  ``GPUMETER_TEST_CLICKHOUSE_DSN`` (e.g. http://localhost:8123).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from secret_watch import TEST_PASSWORD  # with it, every HMAC secret and agent key a test reads

from gpumeter.demo.broker import LocalBroker, create_topic


@pytest.fixture(autouse=True)
def no_secret_in_output(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every line a command prints in-process (click.echo, the errors click shows) and every log record
    of the test is searched for the test's secrets: the password above, the HMAC secrets of every keys
    registry read, the material of every agent key file read. One found fails the test."""
    import logging

    import click.core
    import click.exceptions
    import click.utils

    secrets = {TEST_PASSWORD}
    seen: list[str] = []
    real_echo = click.utils.echo

    def echo(message: Any = None, *args: Any, **kwargs: Any) -> None:
        if message is not None:
            seen.append(message.decode(errors="replace") if isinstance(message, bytes) else str(message))
        real_echo(message, *args, **kwargs)

    for module in (click, click.utils, click.core, click.exceptions):
        monkeypatch.setattr(module, "echo", echo, raising=False)
    try:
        import pipeline.keys as keys_module

        real_host_key = keys_module._host_key

        def host_key(where: str, key_id: str, host_id: str, provider: str, spec: Any) -> Any:
            entry = real_host_key(where, key_id, host_id, provider, spec)
            if entry.algorithm == keys_module.HMAC_SHA256:
                secrets.add(entry.material)
            return entry

        monkeypatch.setattr(keys_module, "_host_key", host_key)
    except ModuleNotFoundError:  # the pipeline extra is not installed
        pass
    import agent.config as agent_config

    real_read_key = agent_config.read_key

    def read_key(path: Path) -> Any:
        key = real_read_key(path)
        text = path.read_text(errors="replace")
        secrets.update(line for line in text.splitlines() if len(line) >= 32 and not line.startswith("-----"))
        if isinstance(key, bytes):
            secrets.add(key.hex())
        return key

    monkeypatch.setattr(agent_config, "read_key", read_key)

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(self.format(record))

    handler = Collect(level=logging.DEBUG)
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
    leaked = sorted({s[:12] + "..." for s in secrets for text in seen if s in text})
    assert not leaked, f"a secret was printed or logged: {leaked}"


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("GPUMETER_TEST_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    log = tmp_path_factory.mktemp("broker") / "broker.log"
    with LocalBroker(log_path=log) as broker:
        yield broker.bootstrap


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    name = f"test-usage-{uuid.uuid4().hex[:10]}"
    create_topic(kafka_bootstrap, name, partitions=3)
    return name


@pytest.fixture(scope="session")
def clickhouse_dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    external = os.environ.get("GPUMETER_TEST_CLICKHOUSE_DSN")
    if external:
        return external
    path: Path = tmp_path_factory.mktemp("chdb") / "data"
    return f"chdb://{path}"


@pytest.fixture
def ch(clickhouse_dsn: str) -> Iterator[tuple[Any, str]]:
    """(client, database): a fresh, schema-ready database for this test, dropped afterwards."""
    from pipeline import clickhouse

    database = f"t_{uuid.uuid4().hex[:12]}"
    client = clickhouse.connect(clickhouse_dsn, database)
    clickhouse.ensure_schema(client, database)
    yield client, database
    client.command(f"DROP DATABASE IF EXISTS {database}")
