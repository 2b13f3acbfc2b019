"""Files at rest are their owner's alone, and the agent's unauthenticated metrics stay on the host."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpumeter.cli import main


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """A login shell's umask (022): what gpumeter makes must be private anyway."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_the_spool_keeps_its_batches_and_state_private_whatever_the_umask(tmp_path: Path, loose_umask: None) -> None:
    """Before: 0644 files and 0755 directories - any local user could read who used which GPU when."""
    from agent.spool import Spool
    from gpumeter.record import record_id

    spool = Spool(tmp_path / "spool")
    start = 1_772_323_200_000
    window = {"record_id": record_id("H", "G", "F1", start), "seq": 0, "provider_id": "P", "host_id": "H",
              "gpu_uuid": "G", "gpu_class": "H100-80G", "firm_id": "F1", "window_start": start,
              "window_end": start + 60_000, "allocated_seconds": 60, "busy_seconds": None, "energy_joules": None,
              "samples_taken": None, "samples_missed": None, "signature": None}  # fmt: skip
    spool.send("H", "test", [window])  # type: ignore[list-item]
    files = [p for p in (tmp_path / "spool").rglob("*") if p.is_file()]
    assert files and {p.name for p in files} >= {"state.json"}
    assert {str(p.relative_to(tmp_path)): mode(p) for p in files} == {
        str(p.relative_to(tmp_path)): 0o600 for p in files
    }
    assert mode(tmp_path / "spool" / "batches") == 0o700


def test_the_cli_makes_its_stores_private(
    tmp_path: Path, loose_umask: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SQLite billing store and the embedded ClickHouse, made by a first command under umask 022."""
    home = tmp_path / "home"
    monkeypatch.setenv("GPUMETER_HOME", str(home))
    monkeypatch.delenv("GPUMETER_BILLING_DB", raising=False)
    monkeypatch.delenv("GPUMETER_CLICKHOUSE_DSN", raising=False)
    with contextlib.suppress(SystemExit):
        main(["billing", "invoices", "--month", "2026-03"])
    capsys.readouterr()
    sqlite = home / "billing.sqlite3"
    assert sqlite.exists() and mode(sqlite) == 0o600
    assert mode(home) == 0o700
    os.umask(0o022)  # main() set the process's umask; the next command starts under a loose one again
    # in a process of its own: the embedded ClickHouse takes one data path per process (the suite's own)
    env = dict(os.environ, GPUMETER_HOME=str(home))
    run = subprocess.run([sys.executable, "-c", "from gpumeter.cli import main; main()", "pipeline", "init"],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    store = home / "clickhouse"
    assert store.is_dir()
    loose = [str(p) for p in [store, *store.rglob("*")] if mode(p) & 0o077]
    assert loose == []


def test_the_agents_metrics_listen_on_this_host_only_unless_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: 0.0.0.0, without authentication, whenever metrics_port was set."""
    import agent.service

    bound: list[tuple[str, int]] = []

    class Server:
        def shutdown(self) -> None: ...

    def serve(host: str, port: int, body: Any) -> Server:
        bound.append((host, port))
        return Server()

    monkeypatch.setattr(agent.service, "serve", serve)
    monkeypatch.setenv("GPUMETER_HOME", str(tmp_path))
    for text, want in (
        ("metrics_port = 9465\n", "127.0.0.1"),
        ('metrics_port = 9465\nmetrics_addr = "0.0.0.0"\n', "0.0.0.0"),
    ):
        (tmp_path / "agent.toml").write_text(text)
        with contextlib.suppress(SystemExit):
            main(["agent", "run", "--simulate", "1", "--duration", "0", "--kafka", "127.0.0.1:1"])
        capsys.readouterr()
        assert bound[-1] == (want, 9465)
