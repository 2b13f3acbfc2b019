"""The usage-record contract: framing, decoding, ids, signatures."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpumeter.errors import RecordError
from gpumeter.record import (
    SOE_MAGIC,
    decode_batch,
    encode_batch,
    record_id,
    schema_versions,
    signature_headers,
    verify,
)


def window(**over: object) -> dict[str, object]:
    w: dict[str, object] = {
        "record_id": record_id("h1", "GPU-1", "F1", 1_772_323_200_000),
        "seq": 7,
        "provider_id": "P01",
        "host_id": "h1",
        "gpu_uuid": "GPU-1",
        "gpu_class": "H100-80G",
        "firm_id": "F1",
        "window_start": 1_772_323_200_000,
        "window_end": 1_772_323_260_000,
        "allocated_seconds": 60,
        "busy_seconds": 42.5,
        "energy_joules": None,
        "samples_taken": 6,
        "samples_missed": 0,
        "signature": None,
    }
    w.update(over)
    return w


def gpu_window(**over: object) -> dict[str, object]:
    g: dict[str, object] = {
        "seq": 8, "provider_id": "P01", "host_id": "h1", "gpu_uuid": "GPU-1", "gpu_class": "H100-80G",
        "window_start": 1_772_323_200_000, "window_end": 1_772_323_260_000, "allocated_seconds": 40,
        "unattributed_seconds": 5, "idle_seconds": 10, "unread_seconds": 3, "unsampled_seconds": 2,
        "usage_windows": 2,
    }  # fmt: skip
    g.update(over)
    return g


def test_roundtrip_keeps_every_field() -> None:
    windows = [window(), window(seq=8, firm_id="F2", busy_seconds=None, energy_joules=1234.5)]
    batch = decode_batch(encode_batch("h1", "0.1.0", windows))
    gpu = [gpu_window(seq=9)]
    batch = decode_batch(encode_batch("h1", "0.1.0", windows, gpu_windows=gpu))
    assert batch == {"host_id": "h1", "agent_version": "0.1.0", "windows": windows, "high_water_seq": 9, "made_at": 0,
                     "gpu_windows": gpu}  # fmt: skip
    heartbeat = decode_batch(encode_batch("h1", "0.1.0", [], high_water_seq=41, made_at_ms=1_772_409_600_000))
    assert heartbeat == {"host_id": "h1", "agent_version": "0.1.0", "windows": [], "high_water_seq": 41,
                         "made_at": 1_772_409_600_000, "gpu_windows": []}  # fmt: skip
    old = decode_batch(encode_batch("h1", "0.1.0", windows, version=2))  # a v2 writer: the defaults
    assert (old["high_water_seq"], old["made_at"], old["gpu_windows"]) == (-1, 0, [])
    v3 = decode_batch(encode_batch("h1", "0.1.0", windows, version=3))
    assert (v3["high_water_seq"], v3["gpu_windows"]) == (8, [])
    with pytest.raises(RecordError, match="cannot carry GPU windows"):  # never silently dropped
        encode_batch("h1", "0.1.0", windows, version=3, gpu_windows=gpu)


def test_value_starts_with_single_object_header_of_a_known_schema() -> None:
    value = encode_batch("h1", "0.1.0", [window()])
    assert value[:2] == SOE_MAGIC
    assert bytes(value[2:10]) in schema_versions()


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        pytest.param(lambda v: b"", "bad magic", id="empty"),
        pytest.param(lambda v: b"\x00" + v[1:], "bad magic", id="magic"),
        pytest.param(lambda v: v[:2] + b"\xff" * 8 + v[10:], "unknown writer schema", id="fingerprint"),
        pytest.param(lambda v: v[:-5], "corrupt Avro body", id="truncated"),
        pytest.param(lambda v: v + b"\x00\x01", "trailing bytes", id="trailing"),
    ],
)
def test_bad_values_are_refused_with_a_reason(mangle, reason) -> None:  # type: ignore[no-untyped-def]
    value = encode_batch("h1", "0.1.0", [window(), window(seq=8)])
    with pytest.raises(RecordError, match=reason):
        decode_batch(mangle(value))


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    with contextlib.suppress(RecordError):
        decode_batch(data)


@given(st.integers(min_value=0, max_value=len(encode_batch("h1", "0.1.0", [window()])) - 1), st.integers(1, 255))
def test_bit_flips_decode_or_fail_cleanly(pos: int, xor: int) -> None:
    value = bytearray(encode_batch("h1", "0.1.0", [window()]))
    value[pos] ^= xor
    with contextlib.suppress(RecordError):
        decode_batch(bytes(value))


def test_record_id_is_deterministic_and_distinguishes_each_part() -> None:
    base = record_id("h1", "GPU-1", "F1", 60_000)
    assert base == record_id("h1", "GPU-1", "F1", 60_000)
    others = {
        record_id("h2", "GPU-1", "F1", 60_000),
        record_id("h1", "GPU-2", "F1", 60_000),
        record_id("h1", "GPU-1", "F2", 60_000),
        record_id("h1", "GPU-1", "F1", 120_000),
    }
    assert base not in others and len(others) == 4


def test_signature_verifies_and_detects_tampering() -> None:
    keys = {"k1": b"secret-1", "k2": b"secret-2"}
    value = encode_batch("h1", "0.1.0", [window()])
    headers = signature_headers(value, "k1", keys["k1"])
    assert verify(value, headers, keys) == "k1"
    tampered = value[:-1] + bytes([value[-1] ^ 1])
    with pytest.raises(RecordError, match="bad signature"):
        verify(tampered, headers, keys)
    with pytest.raises(RecordError, match="unknown signing key"):
        verify(value, signature_headers(value, "k9", b"x"), keys)
    with pytest.raises(RecordError, match="unsigned"):
        verify(value, [], keys)


def test_windows_and_gpu_windows_split_into_runs_of_seqs_inside_the_limit() -> None:
    from gpumeter.record import split_for_messages

    windows = [window(seq=s) for s in range(0, 1200, 2)]
    gpu = [gpu_window(seq=s) for s in range(1, 1200, 2)]
    chunks = split_for_messages(windows, gpu)  # type: ignore[arg-type]
    assert [len(w) + len(g) for w, g in chunks] == [500, 500, 200]
    seqs = [[int(r["seq"]) for r in (*w, *g)] for w, g in chunks]
    assert [sorted(s) for s in seqs] == [list(range(0, 500)), list(range(500, 1000)), list(range(1000, 1200))]
    assert split_for_messages([], []) == [] and split_for_messages(windows[:3], []) == [(windows[:3], [])]  # type: ignore[arg-type]
