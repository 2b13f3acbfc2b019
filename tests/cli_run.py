"""Run the gpumeter CLI in this process, as a user would: (exit code, stdout, stderr)."""

from __future__ import annotations

import pytest

from gpumeter.cli import main


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``main(argv)``; a normal return is exit code 0 (main exits only for a non-zero code)."""
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
