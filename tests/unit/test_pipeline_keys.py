"""The keys registry: Ed25519 public keys by default, HMAC secrets for older hosts, validity periods,
revocation, a file nobody else can read, and the ``gpumeter keys`` commands that keep it."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cli_run import run_cli
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gpumeter.errors import ConfigError, RecordError
from gpumeter.record import public_key_text, signature_headers
from pipeline.keys import (
    HostKey,
    RegistryFile,
    Signer,
    load_registry,
    parse_public_key,
    parse_registry,
    write_registry,
)

SECRET = "00112233445566778899aabbccddeeff" * 2  # 32 bytes, what the agent requires
AGENT = Ed25519PrivateKey.generate()
PUBLIC = public_key_text(AGENT.public_key())
GOOD = {
    "hosts": {
        "P01-H01": {
            "provider_id": "P01",
            "keys": {
                "k1": {"public_key": PUBLIC, "valid_from": datetime(2026, 1, 1, tzinfo=UTC)},
                "old": SECRET,  # the 0.3 form: key id = hex secret
                "old2": {"algorithm": "hmac-sha256", "secret": SECRET[::-1]},
            },
        }
    }
}
JAN_MS = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1000)


def test_an_ed25519_signature_names_the_host_provider_and_validity_of_its_key() -> None:
    reg = parse_registry(GOOD)
    value = b"\xc3\x01batch"
    assert reg.verify(value, signature_headers(value, "k1", AGENT)) == Signer("P01-H01", "P01", JAN_MS, -1)
    assert reg.verify(value, signature_headers(value, "old", bytes.fromhex(SECRET))) == Signer("P01-H01", "P01")
    assert reg.verify(value, signature_headers(value, "old2", bytes.fromhex(SECRET[::-1]))).host_id == "P01-H01"
    assert reg.hosts == {"P01-H01"}


def test_the_pipeline_holds_no_secret_of_an_ed25519_host() -> None:
    """What the registry keeps of an Ed25519 key cannot sign: it is the public key only."""
    key = parse_registry(GOOD).keys["k1"]
    assert key.material == PUBLIC and len(key.material) == 44  # base64 of 32 bytes


OTHER = Ed25519PrivateKey.generate()


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([], "unsigned batch"),
        (signature_headers(b"v", "nope", AGENT), "unknown signing key id 'nope'"),
        (signature_headers(b"v", "k1", OTHER), "bad signature for key id 'k1'"),
        (signature_headers(b"other", "k1", AGENT), "bad signature for key id 'k1'"),
        ([("gm-key-id", b"k1"), ("gm-sig", b"not hex")], "bad signature for key id 'k1'"),
        ([("gm-key-id", b"k1"), ("gm-sig", b"00" * 32)], "bad signature for key id 'k1'"),  # an HMAC's length
        # the HMAC of the public key's bytes: a key id that is Ed25519 is never checked as an HMAC
        (signature_headers(b"v", "k1", parse_public_key(PUBLIC).public_bytes_raw()), "bad signature for key id 'k1'"),
        (signature_headers(b"v", "old", bytes.fromhex(SECRET[::-1])), "bad signature for key id 'old'"),
    ],
    ids=["unsigned", "unknown-key", "other-key", "other-value", "not-hex", "short", "hmac-of-public", "hmac-wrong"],
)
def test_verify_rejects(headers: list[tuple[str, bytes]], reason: str) -> None:
    with pytest.raises(RecordError) as err:
        parse_registry(GOOD).verify(b"v", headers)
    assert str(err.value) == reason


def test_a_revoked_key_verifies_nothing_even_a_good_signature() -> None:
    data: dict[str, Any] = {"hosts": {"h": {"provider_id": "P", "keys": {"k": {"public_key": PUBLIC}}}}}
    data["hosts"]["h"]["keys"]["k"]["revoked_at"] = datetime(2026, 5, 1, tzinfo=UTC)
    with pytest.raises(RecordError) as err:
        parse_registry(data).verify(b"v", signature_headers(b"v", "k", AGENT))
    assert str(err.value) == "revoked signing key id 'k'"


def _one(spec: Any) -> dict[str, Any]:
    return {"hosts": {"h": {"provider_id": "P", "keys": {"k": spec}}}}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, 'f: needs at least one [hosts."HOST_ID"] table'),
        ({**GOOD, "extra": 1}, "f: unknown top-level key(s) extra; expected only [hosts.*]"),
        ({"hosts": {"h": {"keys": {"k": SECRET}}}}, "f: hosts.h.provider_id must be a non-empty string"),
        ({"hosts": {"h": {"provider_id": "P"}}}, "f: hosts.h.keys must hold at least one key"),
        (_one("zz"), "f: hosts.h.keys.k must be a secret of at least 32 bytes of hex"),
        # 16 bytes: accepted before, though no agent would sign with it
        (_one(SECRET[:32]), "f: hosts.h.keys.k must be a secret of at least 32 bytes of hex"),
        (_one({"public_key": "abc"}), "f: hosts.h.keys.k.public_key is not an Ed25519 public key: not base64"),
        (
            _one({"public_key": "AAAA"}),
            "f: hosts.h.keys.k.public_key is not an Ed25519 public key: an Ed25519 public key has 32 bytes, this has 3",
        ),
        (
            _one({"public_key": PUBLIC, "secret": SECRET}),
            "f: hosts.h.keys.k: an ed25519 key has a public_key, never a secret",
        ),
        (
            _one({"algorithm": "rsa", "public_key": PUBLIC}),
            "f: hosts.h.keys.k.algorithm must be one of ed25519, hmac-sha256, got 'rsa'",
        ),
        (
            _one({"public_key": PUBLIC, "valid_from": datetime(2026, 1, 1)}),
            "f: hosts.h.keys.k.valid_from must be a date-time with its UTC offset, e.g. 2026-12-01T00:00:00Z",
        ),
        (
            _one({"public_key": PUBLIC, "valid_from": datetime(2026, 2, 1, tzinfo=UTC),
                  "valid_until": datetime(2026, 1, 1, tzinfo=UTC)}),
            "f: hosts.h.keys.k: valid_until must be after valid_from",
        ),
        (
            _one({"public_key": PUBLIC, "expires": 1}),
            "f: hosts.h.keys.k: unknown field(s) expires; expected algorithm, note, public_key, revoked_at, "
            "secret, valid_from, valid_until",
        ),
        (
            {
                "hosts": {
                    "a": {"provider_id": "P", "keys": {"k": SECRET}},
                    "b": {"provider_id": "P", "keys": {"k": SECRET}},
                }
            },
            "f: key id 'k' appears for more than one host",
        ),
    ],
    ids=["empty", "unknown-top", "no-provider", "no-keys", "not-hex", "16-bytes", "public-not-base64",
         "public-short", "ed25519-secret", "algorithm", "naive-time", "until-before-from", "unknown-field",
         "shared-key-id"],
)  # fmt: skip
def test_bad_registry_says_what_is_wrong(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_registry(data, "f")
    assert str(err.value) == message


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_load_registry_from_toml_in_both_forms(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "keys.toml",
        f'[hosts."P01-H01"]\nprovider_id = "P01"\nkeys = {{ "k1" = "{SECRET}" }}\n'
        f'[hosts."P01-H02"]\nprovider_id = "P01"\n[hosts."P01-H02".keys."k2"]\npublic_key = "{PUBLIC}"\n'
        "valid_until = 2027-01-01T00:00:00Z\n",
    )
    until = int(datetime(2027, 1, 1, tzinfo=UTC).timestamp() * 1000)
    assert load_registry(path).signers == {"k1": Signer("P01-H01", "P01"), "k2": Signer("P01-H02", "P01", -1, until)}
    with pytest.raises(ConfigError) as err:
        load_registry(tmp_path / "missing.toml")
    assert str(err.value) == f"{tmp_path / 'missing.toml'}: keys file not found"


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o620])
def test_a_registry_file_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = _write(
        tmp_path / "keys.toml", f'[hosts.h]\nprovider_id = "P"\n[hosts.h.keys.k]\npublic_key = "{PUBLIC}"\n', mode
    )
    with pytest.raises(ConfigError) as err:
        load_registry(path)
    assert str(err.value) == f"{path}: keys file is open to other users (mode {mode:04o}); chmod 600 {path}"
    for fine in (0o600, 0o400, 0o440):  # 0440: a Kubernetes Secret with fsGroup; public keys are no secret
        path.chmod(fine)
        assert load_registry(path).hosts == {"h"}


def test_a_registry_holding_an_hmac_secret_is_for_its_owner_alone(tmp_path: Path) -> None:
    path = _write(tmp_path / "keys.toml", f'[hosts.h]\nprovider_id = "P"\nkeys = {{ k = "{SECRET}" }}\n', 0o640)
    with pytest.raises(ConfigError) as err:
        load_registry(path)
    assert (
        str(err.value)
        == f"{path}: keys file holds HMAC secrets (k) and its group can read it (mode 0640); chmod 600 {path}"
    )
    path.chmod(0o600)
    assert load_registry(path).hosts == {"h"}


def test_a_running_loader_reads_a_changed_registry_and_keeps_the_last_good_one(tmp_path: Path) -> None:
    now = [0.0]
    path = _write(tmp_path / "keys.toml", f'[hosts.h]\nprovider_id = "P"\nkeys = {{ k = "{SECRET}" }}\n')
    watched = RegistryFile(path, every_s=5, clock=lambda: now[0])
    value = b"v"
    new = signature_headers(value, "k2", AGENT)
    with pytest.raises(RecordError, match="unknown signing key id 'k2'"):
        watched.verify(value, new)
    registry = load_registry(path)
    registry.keys["k2"] = HostKey("k2", "h", "P", "ed25519", PUBLIC)
    write_registry(path, registry)
    now[0] = 4.0  # not looked at again yet
    with pytest.raises(RecordError):
        watched.verify(value, new)
    now[0] = 5.0
    assert watched.verify(value, new).host_id == "h" and watched.reloads == 1
    _write(path, "not toml =")
    os.utime(path, ns=(1, 1))
    now[0] = 11.0
    assert watched.verify(value, new).host_id == "h"  # the broken file is not taken
    assert watched.reloads == 1


# --- gpumeter keys -------------------------------------------------------------------------------


def test_keys_new_rotate_revoke_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = tmp_path / "keys.toml"
    first, second = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    pub1, pub2 = public_key_text(first.public_key()), public_key_text(second.public_key())
    code, out, err = run_cli(["keys", "new", "--registry", str(reg), "--host", "P01-H01", "--provider", "P01",
                           "--public-key", pub1, "--key-id", "H01.a"], capsys)  # fmt: skip
    assert code == 0, err
    assert reg.stat().st_mode & 0o777 == 0o600
    assert "set key_id = 'H01.a'" in out
    # a second first key for the same host is a mistake: rotate is the way
    code, _, err = run_cli(["keys", "new", "--registry", str(reg), "--host", "P01-H01", "--provider", "P01",
                         "--public-key", pub2], capsys)  # fmt: skip
    assert code == 1 and "already has keys" in err
    switch = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    pub_file = _write(tmp_path / "second.pub", pub2 + "\n")
    code, out, err = run_cli(["keys", "rotate", "--registry", str(reg), "--host", "P01-H01", "--public-key",
                           str(pub_file), "--key-id", "H01.b", "--at", switch.isoformat()], capsys)  # fmt: skip
    assert code == 0, err
    keys = load_registry(reg).keys
    # both valid a day either side of the switch: the agent switches when it restarts, not at the second
    assert keys["H01.a"].valid_until == switch + timedelta(days=1)
    assert keys["H01.b"].valid_from == switch - timedelta(days=1)
    assert load_registry(reg).verify(b"v", signature_headers(b"v", "H01.a", first)).valid_until_ms == int(
        (switch + timedelta(days=1)).timestamp() * 1000
    )
    code, out, _ = run_cli(["keys", "list", "--registry", str(reg)], capsys)
    states = {line.split()[0]: line.split()[4] for line in out.splitlines()[1:]}
    assert states == {"H01.a": "current", "H01.b": "current"}  # both, inside the overlap
    # a switch in the past would refuse batches the old key signed since then
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    code, _, err = run_cli(["keys", "rotate", "--registry", str(reg), "--host", "P01-H01", "--public-key",
                         public_key_text(Ed25519PrivateKey.generate().public_key()), "--at", past], capsys)  # fmt: skip
    assert code == 2 and "is in the past" in err
    before = reg.read_bytes()
    code, _, err = run_cli(
        ["keys", "revoke", "--registry", str(reg), "H01.a", "--reason", "disk stolen", "--yes"], capsys
    )
    assert code == 0, err
    with pytest.raises(RecordError, match=r"revoked signing key id 'H01\.a'"):
        load_registry(reg).verify(b"v", signature_headers(b"v", "H01.a", first))
    assert load_registry(reg).keys["H01.a"].note == "revoked: disk stolen"
    assert reg.read_bytes() != before
    code, _, err = run_cli(["keys", "revoke", "--registry", str(reg), "H01.x", "--reason", "r", "--yes"], capsys)
    assert code == 1 and "no key 'H01.x'" in err


def test_keys_commands_refuse_a_bad_public_key_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = tmp_path / "keys.toml"
    code, _, err = run_cli(["keys", "new", "--registry", str(reg), "--host", "h", "--provider", "P",
                         "--public-key", "bm90IGEga2V5"], capsys)  # fmt: skip
    assert code == 2 and "is not an Ed25519 public key" in err
    assert not reg.exists()


def test_a_second_rotation_never_lengthens_an_ended_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = tmp_path / "keys.toml"
    pubs = [public_key_text(Ed25519PrivateKey.generate().public_key()) for _ in range(3)]
    assert run_cli(["keys", "new", "--registry", str(reg), "--host", "h", "--provider", "P", "--public-key", pubs[0],
                 "--key-id", "k0"], capsys)[0] == 0  # fmt: skip
    first = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    second = first + timedelta(hours=2)
    for pub, kid, at, overlap in ((pubs[1], "k1", first, "0"), (pubs[2], "k2", second, "1")):
        code, _, err = run_cli(["keys", "rotate", "--registry", str(reg), "--host", "h", "--public-key", pub,
                             "--key-id", kid, "--at", at.isoformat(), "--overlap", overlap], capsys)  # fmt: skip
        assert code == 0, err
    keys = load_registry(reg).keys
    assert keys["k0"].valid_until == first  # --overlap 0: exactly at the switch, and not moved by the next one
    assert keys["k1"].valid_from == first and keys["k1"].valid_until == second + timedelta(days=1)
    assert keys["k2"].valid_from == second - timedelta(days=1)
