"""The demo's work folder: one demo at a time per folder, and nothing half-deleted left behind."""

from __future__ import annotations

import fcntl
import subprocess
import sys
from pathlib import Path

import pytest

from gpumeter.demo.cli import MARKER, _fresh_dir
from gpumeter.errors import GpumeterError

GPUMETER = Path(sys.executable).with_name("gpumeter")


def test_a_second_demo_on_the_same_folder_is_refused_and_touches_nothing(tmp_path: Path) -> None:
    work, lock = _fresh_dir(tmp_path / "demo")
    (work / "clickhouse").mkdir()  # the running demo's work
    with pytest.raises(GpumeterError, match="another gpumeter demo is running in"):
        _fresh_dir(tmp_path / "demo")
    # through the CLI: a plain message, exit 1, the running demo's folder intact
    env = {"GPUMETER_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([str(GPUMETER), "demo", "--workdir", str(work)], capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "another gpumeter demo is running in" in proc.stderr and "Traceback" not in proc.stderr
    assert (work / "clickhouse").is_dir() and (work / MARKER).exists()
    lock.close()  # the first demo ends: the next one replaces the folder
    again, lock = _fresh_dir(tmp_path / "demo")
    assert sorted(p.name for p in again.iterdir()) == [MARKER]
    lock.close()


def test_a_folder_left_by_a_killed_replacement_is_cleaned_up(tmp_path: Path) -> None:
    """A run killed after it renamed the old folder away leaves ``.demo.old-PID``: the next run
    deletes it (it has the marker) and leaves foreign folders alone."""
    leftover = tmp_path / ".demo.old-12345"
    (leftover / "clickhouse").mkdir(parents=True)
    (leftover / MARKER).write_text("x")
    foreign = tmp_path / ".demo.old-999"
    foreign.mkdir()
    work, lock = _fresh_dir(tmp_path / "demo")
    assert not leftover.exists() and foreign.exists() and (work / MARKER).exists()
    lock.close()


def test_a_folder_that_is_not_a_demo_folder_is_never_deleted(tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "thesis.tex").write_text("years of work")
    with pytest.raises(GpumeterError, match="is not a gpumeter demo folder"):
        _fresh_dir(tmp_path / "demo")
    assert (tmp_path / "demo" / "thesis.tex").exists()
    # and the refused run does not keep the folder locked
    with (tmp_path / ".demo.lock").open("a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
