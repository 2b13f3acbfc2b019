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

from gpumeter.demo.broker import LocalBroker, create_topic


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
