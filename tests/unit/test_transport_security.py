"""TLS and SASL settings as the Kafka clients and ClickHouse get them: one mapping for agent, loader
and dead-letter producer; an https:// DSN that really is TLS, certificate verified."""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path

import pytest
from secret_watch import TEST_PASSWORD
from tls_helpers import FirstBytes, make_ca_and_server

from gpumeter.errors import ConfigError
from gpumeter.settings import Settings, load_settings


def settings(tmp_path: Path, **values: str) -> Settings:
    return Settings(home=tmp_path, **values)  # type: ignore[arg-type]


def test_plaintext_is_the_default_and_maps_to_nothing(tmp_path: Path) -> None:
    assert settings(tmp_path).kafka_security() == {}


def test_sasl_ssl_with_scram_maps_to_kafka_python_settings(tmp_path: Path) -> None:
    ca, _, _ = make_ca_and_server(tmp_path)
    secret = tmp_path / "kafka.password"
    secret.write_text(TEST_PASSWORD + "\n")
    secret.chmod(0o600)
    config = tmp_path / "config.toml"
    config.write_text(
        f'kafka_security_protocol = "SASL_SSL"\nkafka_ssl_cafile = "{ca}"\nkafka_sasl_username = "agent-p01"\n'
        f'kafka_sasl_password_file = "{secret}"\n'
    )
    got = load_settings(config=config, environ={"GPUMETER_HOME": str(tmp_path)}).kafka_security()
    assert got == {
        "security_protocol": "SASL_SSL", "ssl_check_hostname": True, "ssl_cafile": str(ca),
        "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "agent-p01", "sasl_plain_password": TEST_PASSWORD,
    }  # fmt: skip
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient

    for client in (KafkaProducer, KafkaConsumer, KafkaAdminClient):  # every key is one the client knows
        assert set(got) <= set(client.DEFAULT_CONFIG), client.__name__
    # the password may come from the environment instead (a Kubernetes Secret), never from the file
    env = {"GPUMETER_HOME": str(tmp_path), "GPUMETER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
           "GPUMETER_KAFKA_SASL_USERNAME": "u", "GPUMETER_KAFKA_SASL_PASSWORD": "from-env",
           "GPUMETER_KAFKA_SASL_MECHANISM": "scram-sha-256"}  # fmt: skip
    got = load_settings(environ=env).kafka_security()
    assert (got["sasl_plain_password"], got["sasl_mechanism"]) == ("from-env", "SCRAM-SHA-256")
    config.write_text('kafka_sasl_password = "x"\n')
    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings(config=config, environ={"GPUMETER_HOME": str(tmp_path)})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"kafka_security_protocol": "TLS"}, "kafka_security_protocol 'TLS': one of PLAINTEXT, SSL"),
        ({"kafka_ssl_cafile": "/x"}, "kafka_ssl_cafile set but kafka_security_protocol is PLAINTEXT"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_cafile": "/nonexistent"},
         "kafka_ssl_cafile /nonexistent: no such file"),
        ({"kafka_security_protocol": "SASL_SSL"}, "kafka_security_protocol SASL_SSL needs kafka_sasl_username"),
        ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_username": "u"}, "SASL needs a password"),
        (
            {"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": "PLAIN", "kafka_sasl_username": "u"},
            "SASL PLAIN over SASL_PLAINTEXT sends the password in clear",
        ),
        ({"kafka_security_protocol": "SSL", "kafka_sasl_username": "u"},
         "kafka_sasl_* set but kafka_security_protocol is SSL"),
    ],
    ids=["protocol", "tls-without-ssl", "missing-ca", "no-user", "no-password", "plain-in-clear", "sasl-without-sasl"],
)  # fmt: skip
def test_security_settings_that_make_no_sense_are_refused(tmp_path: Path, values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings(tmp_path, **values).kafka_security()
    assert message in str(err.value)


def test_a_password_file_others_can_read_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("pw")
    secret.chmod(0o644)
    s = settings(tmp_path, kafka_security_protocol="SASL_SSL", kafka_sasl_username="u",
                 kafka_sasl_password_file=str(secret))  # fmt: skip
    with pytest.raises(ConfigError, match="open to other users"):
        s.kafka_security()


def _try_connect(dsn: str, ca_file: str = "") -> Exception | None:
    from pipeline import clickhouse

    try:
        clickhouse.connect(dsn, "gm", ca_file)
    except Exception as exc:
        return exc
    return None


def test_an_https_dsn_speaks_tls_whatever_the_port(tmp_path: Path) -> None:
    """Before: clickhouse-connect took TLS from the port (8443/443) only, so https://host:9000 sent the
    password over plain HTTP. The server here records what arrives first."""
    server = FirstBytes()
    try:
        _try_connect(f"https://loader:{TEST_PASSWORD}@127.0.0.1:{server.port}/")
        _try_connect(f"http://loader:{TEST_PASSWORD}@127.0.0.1:{server.port}/")
    finally:
        server.close()
    assert server.seen, "no connection arrived"
    tls, plain = server.seen[0], server.seen[-1]
    assert tls[:2] == b"\x16\x03", tls  # a TLS handshake record
    assert plain[:4] in (b"POST", b"GET "), plain  # http:// stays plain, as asked


def test_an_https_dsn_verifies_the_servers_certificate(tmp_path: Path) -> None:
    """A server whose certificate no trusted CA signed is refused; given its CA (clickhouse_ca_file),
    the handshake completes."""
    import socket
    import threading

    ca, cert, key = make_ca_and_server(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    outcomes: list[str] = []

    def serve() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(raw, server_side=True) as tls:
                    tls.recv(4096)
                    outcomes.append("handshake")
                    tls.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
            except (ssl.SSLError, OSError):
                outcomes.append("refused")

    from pipeline.clickhouse import tls_options

    threading.Thread(target=serve, daemon=True).start()
    try:
        unknown = _try_connect(f"https://u:{TEST_PASSWORD}@127.0.0.1:{port}/")
        trusted = _try_connect(f"https://u:{TEST_PASSWORD}@127.0.0.1:{port}/", str(ca))
    finally:
        listener.close()
    assert unknown is not None and "certificate verify failed" in repr(unknown).lower() + str(unknown).lower()
    assert outcomes[0] == "refused" and "handshake" in outcomes[1:]
    assert trusted is not None  # not ClickHouse behind it: the query fails, after a verified handshake
    for weakening in ("verify=false", "secure=false", "ca_cert=/tmp/x", "server_host_name=other"):
        with pytest.raises(ConfigError, match="an https:// DSN is always verified TLS"):
            tls_options(f"https://u:p@h:9000/db?{weakening}")
    with pytest.raises(ConfigError, match="the DSN is http://, not https://"):
        tls_options("http://h:8123", str(ca))


def test_a_postgresql_urls_tls_settings_reach_libpq(tmp_path: Path) -> None:
    """The billing store passes a postgresql:// URL to psycopg whole: sslmode, sslrootcert and the
    client certificate settings are libpq's own and arrive as written."""
    psycopg = pytest.importorskip("psycopg")
    from billing.adapters.store import parse_url

    url = "postgresql://billing@db.example:5432/gm?sslmode=verify-full&sslrootcert=/etc/gpumeter/pg-ca.pem"
    target = parse_url(url).target
    assert psycopg.conninfo.conninfo_to_dict(target) == {
        "user": "billing", "host": "db.example", "port": "5432", "dbname": "gm",
        "sslmode": "verify-full", "sslrootcert": "/etc/gpumeter/pg-ca.pem",
    }  # fmt: skip


def test_at_vv_kafka_python_does_not_log_its_requests_or_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """kafka-python logs every request at DEBUG - a SASL handshake's bytes among them - and the admin
    client its whole config, password included: -vv keeps those loggers at INFO."""
    import logging

    from gpumeter.cli import main

    monkeypatch.setenv("GPUMETER_HOME", str(tmp_path))
    for name in ("kafka", "kafka.net.connection", "kafka.conn", "kafka.admin.client"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    # what -vv does to the root logger outside pytest (whose own handler makes basicConfig a no-op)
    monkeypatch.setattr(logging.getLogger(), "level", logging.DEBUG)
    logging.Logger.manager._clear_cache()  # type: ignore[attr-defined]
    with contextlib.suppress(SystemExit):
        main(["-vv", "keys", "list", "--registry", str(tmp_path / "none.toml")])
    capsys.readouterr()
    logging.Logger.manager._clear_cache()  # type: ignore[attr-defined]
    for name in ("kafka.net.connection", "kafka.conn", "kafka.admin.client"):
        assert not logging.getLogger(name).isEnabledFor(logging.DEBUG), name
