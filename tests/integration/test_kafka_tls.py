"""Kafka over TLS, end to end on real components: the local broker behind a TLS-terminating proxy
(the broker advertises the proxy, so every connection a client makes is TLS). The agent as operators
run it (``gpumeter agent run``) takes the TLS settings from the environment; the loader and its
dead-letter producer get the client settings the same environment gives ``pipeline run``; a client
that does not verify against the right CA, or speaks plain Kafka, gets nothing.

The local broker offers no TLS listener of its own (its --cert option did not answer a TLS
handshake here), hence the proxy. SASL/SCRAM is not tested against a broker: none here speaks it;
tests/unit/test_transport_security.py checks its mapping into every client's settings."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tls_helpers import TlsProxy, make_ca_and_server

from gpumeter.demo.broker import LocalBroker, create_topic, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[str, Path, TlsProxy]]:
    ca, cert, key = make_ca_and_server(tmp_path)
    proxy_port = free_port()
    with LocalBroker(log_path=tmp_path / "broker.log", advertised_port=proxy_port) as broker:
        proxy = TlsProxy(cert, key, broker.port, proxy_port)
        try:
            yield f"127.0.0.1:{proxy_port}", ca, proxy
        finally:
            proxy.close()


def gpumeter(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from gpumeter.cli import main; main()", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_agent_loader_and_dead_letter_talk_to_kafka_over_verified_tls(
    tls_broker: tuple[str, Path, Any], tmp_path: Path, ch: tuple[Any, str], clickhouse_dsn: str
) -> None:
    from kafka import KafkaConsumer, KafkaProducer

    _, db = ch
    bootstrap, ca, proxy = tls_broker
    security = {"security_protocol": "SSL", "ssl_cafile": str(ca), "ssl_check_hostname": True}
    create_topic(bootstrap, "usage-tls", 1, security=security)
    env = dict(os.environ, GPUMETER_HOME=str(tmp_path / "home"), GPUMETER_KAFKA_BOOTSTRAP=bootstrap,
               GPUMETER_TOPIC="usage-tls", GPUMETER_KAFKA_SECURITY_PROTOCOL="SSL", GPUMETER_KAFKA_SSL_CAFILE=str(ca),
               GPUMETER_CLICKHOUSE_DSN=f"chdb://{tmp_path / 'ch'}")  # fmt: skip
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "agent.toml").write_text('provider_id = "P01"\nhost_id = "P01-H01"\n')
    key = tmp_path / "P01-H01.key"
    made_key = gpumeter(["agent", "keygen", str(key)], env)
    assert made_key.returncode == 0, made_key.stderr
    agent_pub = made_key.stdout.splitlines()[1]  # keygen prints the public key on its second line
    registry = tmp_path / "keys.toml"
    made = gpumeter(["keys", "new", "--registry", str(registry), "--host", "P01-H01", "--provider", "P01",
                     "--public-key", agent_pub, "--key-id", "P01-H01"], env)  # fmt: skip
    assert made.returncode == 0, made.stderr
    agent = gpumeter(["agent", "run", "--simulate", "2", "--interval", "1", "--window", "5", "--duration", "12",
                      "--key-file", str(key), "--spool", str(tmp_path / "spool")], env)  # fmt: skip
    assert agent.returncode == 0, agent.stderr[-3000:]
    assert "windows_spooled=0" in agent.stderr, agent.stderr[-2000:]  # everything acknowledged over TLS
    sent = int(agent.stderr.rsplit("windows_sent=", 1)[1].split()[0])
    assert sent > 0
    # the loader and its dead-letter producer, with the security the same settings give the CLI's
    # `pipeline run` (in this process: with fast_rebalance the group joins in seconds; a CLI run over
    # this proxy sometimes took longer than any idle timeout a test can wait)
    from gpumeter.record import encode_batch
    from gpumeter.settings import load_settings
    from pipeline import clickhouse
    from pipeline.keys import load_registry
    from pipeline.loader import DeadLetter, Loader, make_consumer

    from_settings = load_settings(environ=env).kafka_security()
    assert from_settings == security
    forged = encode_batch("P01-H01", "forger", [])
    producer = KafkaProducer(bootstrap_servers=bootstrap, **from_settings)
    producer.send("usage-tls", value=forged, headers=[("gm-key-id", b"P01-H01"), ("gm-sig", b"00" * 64)]).get(30)
    producer.close()
    create_topic(bootstrap, "usage-tls.dead-letter", 1, security=from_settings)
    client = clickhouse.connect(clickhouse_dsn, db)
    consumer = make_consumer(bootstrap, "usage-tls", "g-tls", fast_rebalance=True, security=from_settings)
    dead = DeadLetter(bootstrap, "usage-tls.dead-letter", security=from_settings)
    loader = Loader(consumer, client, db, "usage-tls", keys=load_registry(registry), dead_letter=dead)
    try:
        stats = loader.run(until=lambda st: st.windows >= sent and st.quarantined >= 1, idle_timeout_s=60)
    finally:
        consumer.close(autocommit=False)
        dead.close()
    assert (stats.windows, stats.quarantined) == (sent, 1)
    reader = KafkaConsumer("usage-tls.dead-letter", bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                           consumer_timeout_ms=20_000, **from_settings)  # fmt: skip
    got = [m.value for _, m in zip(range(1), reader, strict=False)]
    reader.close()
    assert got == [forged]  # dead-lettered over TLS too
    assert proxy.handshakes >= 2  # (the loader's reachability probe is a bare TCP connect: no handshake)
    # a client that trusts only the system's CAs gets no handshake; one that speaks plain Kafka, no answer
    env_system_cas = {k: v for k, v in env.items() if k != "GPUMETER_KAFKA_SSL_CAFILE"}
    before = proxy.failed_handshakes
    refused = gpumeter(["agent", "check", "--key-file", str(key)], env_system_cas, 120)
    assert refused.returncode == 1 and f"{bootstrap} not reachable over SSL" in refused.stdout, refused.stdout
    assert proxy.failed_handshakes > before
    plain = {k: v for k, v in env.items() if not k.startswith("GPUMETER_KAFKA_S")}
    refused = gpumeter(["agent", "check", "--key-file", str(key)], plain, 120)
    assert refused.returncode == 1 and f"{bootstrap} not reachable (" in refused.stdout, refused.stdout
