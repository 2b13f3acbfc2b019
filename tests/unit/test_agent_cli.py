"""`gpumeter agent` at the edges: exact messages, checks one by one, metrics text, config."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import checks
from agent.config import AgentConfig, load_agent_config
from gpumeter.cli import main
from gpumeter.errors import ConfigError
from gpumeter.metrics import Metric, render


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def test_agent_run_without_nvml_or_simulate_says_what_to_do(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUMETER_HOME", str(tmp_path))
    code, _, err = run(["agent", "run", "--kafka", "127.0.0.1:1"], capsys)
    assert code == 1
    assert err.splitlines()[-1] == (
        "Error: NVML is not available on this host (NVML Shared Library Not Found): "
        "install the NVIDIA driver, or use --simulate N to meter simulated GPUs"
    )
    assert not (tmp_path / "spool").exists()  # nothing created on the way out


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o620, 0o604], ids=["world", "group-read", "group-write", "other"])
def test_a_key_file_open_to_anyone_but_its_owner_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int
) -> None:
    """0600 or stricter, as ssh asks of a private key: a group that can read it can sign as the host."""
    monkeypatch.setenv("GPUMETER_HOME", str(tmp_path))
    key = tmp_path / "host.key"
    key.write_text("00" * 32)
    key.chmod(mode)
    code, _, err = run(["agent", "run", "--simulate", "1", "--key-file", str(key), "--duration", "0"], capsys)
    assert code == 1
    assert err.splitlines()[-1] == f"Error: signing key {key} is open to other users (mode {mode:04o}); chmod 600 {key}"


def test_keygen_makes_a_private_ed25519_key_that_the_agent_signs_with(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.config import read_key
    from gpumeter.record import signature_headers, verify
    from pipeline.keys import parse_public_key

    path = tmp_path / "agent.key"
    main(["agent", "keygen", str(path), "--host", "P01-H01", "--provider", "P01"])
    out, err = capsys.readouterr()
    assert path.stat().st_mode & 0o777 == 0o600
    public = out.splitlines()[1]
    assert f"gpumeter keys new --host P01-H01 --provider P01 --public-key {public}" in err
    key = read_key(path)
    assert isinstance(key, Ed25519PrivateKey)
    headers = signature_headers(b"value", "k", key)
    assert verify(b"value", headers, {"k": parse_public_key(public)}) == "k"
    before = path.read_bytes()
    code, _, err = run(["agent", "keygen", str(path)], capsys)
    assert code == 1 and "exists; a key file is never overwritten" in err
    assert path.read_bytes() == before


def test_window_must_be_a_multiple_of_interval_from_config_too(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUMETER_HOME", str(tmp_path))
    (tmp_path / "agent.toml").write_text("[agent]\ninterval_s = 7\n")
    code, _, err = run(["agent", "run", "--simulate", "1"], capsys)
    assert code == 2
    assert "--window (60) must be a multiple of --interval (7)" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nope = 1\n", "unknown agent setting(s) nope; known: provider_id, host_id, interval_s"),
        ("interval_s = '5'\n", "agent setting interval_s must be int, got '5'"),
        ("[attribution]\nwho = 1\n", "unknown [attribution] setting(s) who"),
        ("interval_s = \n", "not valid TOML"),
        ('window_s = 5\n[agent]\nprovider_id = "P02"\n', "setting(s) window_s outside the [agent] table"),
        ("interval_s = 0\n", "agent setting interval_s must be >= 1, got 0"),
        ("[agent]\nwindow_s = -60\n", "agent setting window_s must be >= 1, got -60"),
    ],
    ids=["unknown", "type", "attribution-key", "toml", "beside-agent-table", "zero-interval", "negative-window"],
)
def test_agent_config_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_agent_config(path)
    assert str(err.value).startswith(f"{path}: {message}")


def test_agent_config_file_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('provider_id = "P07"\nwindow_s = 120\nsend_retry_max_s = 3\n[gpu_classes]\n"X" = "Y"\n')
    cfg = load_agent_config(path, window_s=30, provider_id=None)
    assert (cfg.provider_id, cfg.window_s, cfg.send_retry_max_s, cfg.gpu_classes) == ("P07", 30, 3.0, {"X": "Y"})


def test_check_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "k1.hex"
    assert checks.check_key(AgentConfig()) == (
        False,
        "no signing key configured (key_file): batches would go out unsigned",
    )
    key.write_text("abcd")
    key.chmod(0o600)
    assert checks.check_key(AgentConfig(key_file=str(key))) == (
        False,
        f"signing key {key} has 2 bytes; at least 32 are needed",
    )
    key.write_text("ab" * 32)
    assert checks.check_key(AgentConfig(key_file=str(key))) == (True, f"key id k1 (HMAC-SHA256, 32 bytes) from {key}")
    pem = tmp_path / "P01-H01.2026.key"
    main(["agent", "keygen", str(pem)])
    public = capsys.readouterr().out.splitlines()[1]
    assert checks.check_key(AgentConfig(key_file=str(pem))) == (
        True,
        f"key id P01-H01.2026 (Ed25519, public key {public}) from {pem}",
    )


@pytest.mark.parametrize(
    ("now", "state", "ok", "text"),
    [
        (1_790_000_000, 0, True, "2026-09-21T14:13:20Z UTC, kernel reports synchronised"),
        (1_790_000_000, None, True, "2026-09-21T14:13:20Z UTC, kernel reports sync state unknown"),
        (1_790_000_000, 5, False, "kernel reports the clock unsynchronised (no NTP/PTP?) at 2026-09-21T14:13:20Z"),
        (1_000_000_000, 0, False, "system time 2001-09-09T01:46:40Z is before 2025-01-01: windows would be wrong"),
    ],
    ids=["synced", "unknown", "unsynced", "in-the-past"],
)
def test_check_clock(now: int, state: int | None, ok: bool, text: str) -> None:
    assert checks.check_clock(lambda: now, lambda: state) == (ok, text)


def test_check_spool_writable_and_full(tmp_path: Path) -> None:
    ok, text = checks.check_spool(tmp_path / "spool", 1 << 20)
    assert ok and text == f"{tmp_path / 'spool'} writable, 0 window(s) in 0 batch(es), 0 of 1048576 bytes"
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    ok, text = checks.check_spool(tmp_path / "ro" / "spool", 1 << 20)
    if ok:  # running as root: permissions do not stop us; the verdict must still be honest
        assert (tmp_path / "ro" / "spool").exists()
    else:
        assert text.startswith(f"{tmp_path / 'ro' / 'spool'} not writable")
    assert checks.line("spool", (False, "x")) == "FAIL  spool: x"
    assert checks.line("spool", (True, "x")) == "ok    spool: x"


def test_prometheus_text() -> None:
    text = render(
        [
            Metric("gm_up", "gauge", "Up.", (({}, 1),)),
            Metric("gm_err_total", "counter", "Errors.", (({"kind": 'a"b'}, 2), ({"kind": "c"}, 0.5))),
        ]
    )
    assert text == (
        "# HELP gm_up Up.\n# TYPE gm_up gauge\ngm_up 1\n"
        "# HELP gm_err_total Errors.\n# TYPE gm_err_total counter\n"
        'gm_err_total{kind="a\\"b"} 2\ngm_err_total{kind="c"} 0.5\n'
    )
