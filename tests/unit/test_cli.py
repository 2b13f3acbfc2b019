"""CLI behaviour at the edges: exact messages, exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpumeter.cli import _missing, main
from gpumeter.errors import MissingExtraError


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def test_window_must_be_a_multiple_of_interval(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["agent", "run", "--simulate", "1", "--interval", "7", "--window", "60"], capsys)
    assert code == 2
    assert "--window (60) must be a multiple of --interval (7)" in err


def test_missing_extra_names_the_extra(capsys: pytest.CaptureFixture[str]) -> None:
    stub = _missing("pipeline", "pipeline", "clickhouse_connect", "Load usage.")
    with pytest.raises(MissingExtraError) as err:
        stub.main([], standalone_mode=False)
    assert str(err.value) == (
        "this command needs the 'pipeline' extra (module 'clickhouse_connect' is not installed); "
        "install it with: pip install 'gpumeter[pipeline]'"
    )


def test_unknown_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["nope"], capsys)
    assert code == 2
    assert "No such command 'nope'" in err


def test_an_unexpected_error_is_one_plain_message_not_a_traceback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.usage_cli

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the disk is on fire")

    monkeypatch.setattr(pipeline.usage_cli, "_store", broken)
    with pytest.raises(SystemExit) as exit_:
        main(["usage", "summary", "--timezone", "UTC"])
    err = capsys.readouterr().err
    assert exit_.value.code == 70
    assert "Error: unexpected RuntimeError: the disk is on fire" in err and "Traceback" not in err
    crash = Path(err.rsplit("saved in ", 1)[1].strip())
    assert "RuntimeError: the disk is on fire" in crash.read_text()
    crash.unlink()


def test_a_file_the_machine_refuses_is_a_plain_error_not_a_bug(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.usage_cli

    def locked(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", "/var/lib/gpumeter/ch")

    monkeypatch.setattr(pipeline.usage_cli, "_store", locked)
    with pytest.raises(SystemExit) as exit_:
        main(["usage", "summary", "--timezone", "UTC"])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip() == "Error: [Errno 13] Permission denied: '/var/lib/gpumeter/ch'"


def test_billing_load_help_names_every_column_of_its_files(capsys: pytest.CaptureFixture[str]) -> None:
    from billing.adapters.files import FIRM_COLUMNS, VOUCHER_COLUMNS

    main(["billing", "load", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for column in (*VOUCHER_COLUMNS, *FIRM_COLUMNS, "gpu_class", "provider", "price_per_gpu_hour", "effective_from",
                   "year", "category", "budget", "firm_cap", "timezone", "currency", "usage_horizon_days"):  # fmt: skip
        assert column in text, column


def test_the_demo_says_how_to_query_what_it_built() -> None:
    from gpumeter.demo.cli import query_hint

    hint = query_hint(Path("/srv/demo"), "gm", "2026-04")
    assert "GPUMETER_CLICKHOUSE_DSN=chdb:///srv/demo/clickhouse GPUMETER_CLICKHOUSE_DATABASE=gm" in hint
    assert "GPUMETER_BILLING_DB=sqlite:////srv/demo/billing.sqlite3" in hint
    assert "--from 2026-04-01 --to 2026-04-30" in hint and "/srv/demo/billing-inputs/" in hint
