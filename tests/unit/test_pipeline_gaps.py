"""The gap report's text, and the pipeline CLI's errors, exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpumeter.cli import main
from pipeline.gaps import gaps_table


def test_gaps_table_lists_missing_ranges_per_agent() -> None:
    extents = [("h2", 0, 9, 10), ("h1", 0, 20, 16)]
    gaps = [("h1", 14, 14, 16), ("h1", 3, 6, 16)]
    assert gaps_table(extents, gaps) == (
        "h1: seq 0..20, 16 seen, 5 missing\n  missing 3..6\n  missing 14\nh2: seq 0..9, 10 seen, complete"
    )


def test_gaps_table_without_data() -> None:
    assert gaps_table([], []) == "no usage from any agent yet"


def test_run_with_missing_keys_file_fails_before_connecting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "keys.toml"
    with pytest.raises(SystemExit) as exit_info:
        main(["pipeline", "run", "--kafka", "127.0.0.1:1", "--keys", str(missing)])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == f"Error: {missing}: keys file not found\n"


def test_run_without_keys_refuses_to_start_unless_told_it_is_a_test(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loader that checks no signature loads whatever anyone writes to the topic: that is never the
    default. (Before, it started with a warning.)"""
    monkeypatch.delenv("GPUMETER_KEYS", raising=False)
    monkeypatch.setenv("GPUMETER_HOME", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main(["pipeline", "run", "--kafka", "127.0.0.1:1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Error: no --keys file: the loader verifies every batch's signature" in err
    assert "--insecure for a test" in err
    assert not (tmp_path / "clickhouse").exists()  # nothing made on the way out
    keys = tmp_path / "keys.toml"
    keys.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["pipeline", "run", "--kafka", "127.0.0.1:1", "--keys", str(keys), "--insecure"])
    assert exit_info.value.code == 2
    assert "--keys and --insecure together: choose one" in capsys.readouterr().err


def test_gaps_table_reports_a_missing_tail_and_silent_and_unheard_agents() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
    extents = [("h1", 0, 9, 10), ("h2", 0, 4, 5)]
    contact = [
        ("h1", 14, datetime(2026, 3, 2, 11, 59)),  # said it had numbered 14: 10..14 never came
        ("h2", 4, datetime(2026, 3, 2, 11, 0)),  # all in, but nothing for an hour
        ("h3", 2, datetime(2026, 3, 2, 11, 58)),  # heartbeats only: 0..2 never came
    ]
    table = gaps_table(extents, [], contact, now=now, silent_after_s=300, registered=["h1", "h4"])
    assert table == (
        "h1: seq 0..9, 10 seen, 5 missing\n  missing tail 10..14 (the agent had numbered up to 14)\n"
        "h2: seq 0..4, 5 seen, complete\n  silent since 2026-03-02 11:00:00 UTC\n"
        "h3: no windows yet, 3 missing\n  missing tail 0..2 (the agent had numbered up to 2)\n"
        "h4: never heard from (registered in the keys file)"
    )


def test_a_permanent_stop_exits_3_with_its_message(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """A service manager tells a permanent stop (3: do not restart) from other errors (1)."""
    import gpumeter.cli
    from pipeline.loader import LoaderStopped

    def stopped(**_: object) -> None:
        raise LoaderStopped("ClickHouse refused the insert (ACCESS_DENIED): ...")

    monkeypatch.setattr(gpumeter.cli.cli, "main", stopped)
    with pytest.raises(SystemExit) as exit_info:
        main(["pipeline", "run"])
    assert exit_info.value.code == 3
    assert capsys.readouterr().err == "Error: ClickHouse refused the insert (ACCESS_DENIED): ...\n"
