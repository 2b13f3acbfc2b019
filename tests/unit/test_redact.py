"""No secret in any output: DSN and URL passwords are masked wherever gpumeter prints or logs them,
and the suite itself watches every command's output for the test secrets (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_run import run_cli
from secret_watch import TEST_PASSWORD

from gpumeter.redact import redact

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("https://loader:p%40ss@ch.example:8443/db", "https://loader:***@ch.example:8443/db"),
        ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("host=h password=abc user=u", "host=h password=*** user=u"),
        ("http://h:8123/?user=a&password=zz", "http://h:8123/?user=a&password=***"),
        ("https://u:p@ss@host/", "https://u:***@host/"),  # an @ in the password
        ("chdb:///var/lib/gpumeter/clickhouse", "chdb:///var/lib/gpumeter/clickhouse"),
        ("postgres://u@h/db", "postgres://u@h/db"),  # no password: nothing to hide
        ('{"user": "u", "password": "x y"}', '{"user": "u", "password": "***"}'),
        ("PGPASSWORD=abc psql", "PGPASSWORD=*** psql"),
        ("cd pwd=/home/x; token=1", "cd pwd=/home/x; token=1"),  # not a secret's name: left alone
    ],
)
def test_redact_keeps_where_and_who_but_not_the_password(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_a_logged_traceback_is_redacted_too() -> None:
    import logging

    from gpumeter.redact import RedactFilter

    try:
        raise ConnectionError(f"cannot connect to https://loader:{TEST_PASSWORD}@ch.example:8443/")
    except ConnectionError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "insert failed", None, sys.exc_info())
    RedactFilter().filter(record)
    text = logging.Formatter().format(record)
    assert "https://loader:***@ch.example:8443/" in text and TEST_PASSWORD not in text


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code, out, err = run_cli(argv, capsys)
    return code, out + err


def test_an_unsupported_billing_url_is_named_without_its_password(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Before: the error printed the URL whole, password and all."""
    monkeypatch.setenv("GPUMETER_HOME", str(tmp_path))
    monkeypatch.setenv("GPUMETER_BILLING_DB", f"mysql://billing:{TEST_PASSWORD}@db.example/gm")
    code, text = _run(["billing", "invoices", "--month", "2026-03"], capsys)
    assert code == 1
    assert "billing database URL 'mysql://billing:***@db.example/gm' is not supported" in text
    assert TEST_PASSWORD not in text


def test_pipeline_init_names_the_clickhouse_it_could_not_reach_without_its_password(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Before: `pipeline init` echoed the whole DSN; a connection error may quote it too."""
    monkeypatch.setenv("GPUMETER_HOME", str(tmp_path))
    monkeypatch.setenv("GPUMETER_CLICKHOUSE_DSN", f"http://loader:{TEST_PASSWORD}@127.0.0.1:1/")
    code, text = _run(["-vv", "pipeline", "init"], capsys)
    assert code != 0 and "Error:" in text
    assert TEST_PASSWORD not in text


def test_the_suite_fails_a_test_whose_command_prints_a_secret(tmp_path: Path) -> None:
    """The watch in tests/conftest.py can fail: a test that echoes the password, or logs an HMAC secret
    of a registry it read, fails; one that prints the masked form passes."""
    (tmp_path / "test_leak.py").write_text(
        textwrap.dedent(f"""
        import logging
        import click
        from pipeline.keys import parse_registry

        def test_echo_leaks():
            click.echo("dsn https://u:{TEST_PASSWORD}@h")

        def test_log_leaks():
            parse_registry({{"hosts": {{"h": {{"provider_id": "P", "keys": {{"k": "ab" * 32}}}}}}}})
            logging.getLogger("x").warning("secret %s", "ab" * 32)

        def test_masked_is_fine():
            click.echo("dsn https://u:***@h")
    """)
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                          str(tmp_path / "test_leak.py")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    # the watch fails a test in its teardown: pytest counts that as an error of the test
    assert "3 passed, 2 errors" in run.stdout, run.stdout[-2000:]
    assert "ERROR test_leak.py::test_echo_leaks - AssertionError: a secret was printed" in run.stdout
    assert "ERROR test_leak.py::test_log_leaks - AssertionError: a secret was printed" in run.stdout


def test_pipeline_init_says_where_the_schema_is_without_the_password(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Before: 'ClickHouse schema ready in gpumeter (https://loader:PASSWORD@...)'. The server is
    replaced by a stand-in here (none with a password runs on this machine); the line is the CLI's."""
    from pipeline import clickhouse

    monkeypatch.setattr(clickhouse, "connect", lambda dsn, database, ca_file="": object())
    monkeypatch.setattr(clickhouse, "ensure_schema", lambda client, database, cluster=None: None)
    monkeypatch.setenv("GPUMETER_HOME", str(tmp_path))
    monkeypatch.setenv("GPUMETER_CLICKHOUSE_DSN", f"https://loader:{TEST_PASSWORD}@ch.example:8443/")
    code, text = _run(["pipeline", "init"], capsys)
    assert code == 0, text
    assert text == "ClickHouse schema ready in gpumeter (https://loader:***@ch.example:8443/)\n"
