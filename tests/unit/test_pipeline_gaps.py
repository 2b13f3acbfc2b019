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
