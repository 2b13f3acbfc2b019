"""Every window check runs in ClickHouse (the ingest views); each rule fires with its own reason."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import pytest

from gpumeter.record import encode_batch, record_id
from pipeline import clickhouse
from pipeline.framing import Framed, container, shipped_versions, split_value
from pipeline.schema import FUTURE_TOLERANCE_S, WINDOW_CHECKS

pytestmark = pytest.mark.integration

T0 = 1_772_323_200_000  # 2026-03-01T00:00:00Z
SENT = T0 + 120_000  # the Kafka message timestamp
LATE = SENT + FUTURE_TOLERANCE_S * 1000  # a window starting here ends beyond the tolerance
ENERGY = "energy_joules above what the GPU class can draw"
FUTURE = f"window_end more than {FUTURE_TOLERANCE_S} s after the message was produced"


def window(**changes: Any) -> dict[str, Any]:
    w: dict[str, Any] = {
        "seq": 7, "provider_id": "P01", "host_id": "P01-H01", "gpu_uuid": "GPU-a", "gpu_class": "H100-80G",
        "firm_id": "F0001", "window_start": T0, "window_end": T0 + 60_000, "allocated_seconds": 60,
        "busy_seconds": 30.0, "energy_joules": 700.0 * 60, "signature": None,
    }  # fmt: skip
    w.update(changes)
    if "record_id" not in changes:
        w["record_id"] = record_id(w["host_id"], w["gpu_uuid"], w["firm_id"], w["window_start"])
    return w


def load(
    ch: tuple[Any, str], windows: list[dict[str, Any]], batch_host: str = "P01-H01", signer: tuple[str, str] = ("", "")
) -> list[str]:
    client, db = ch
    writer, body = split_value(encode_batch(batch_host, "test", windows), shipped_versions())
    data = container(writer, 0, 1_000_000, [Framed(5, SENT, body, *signer)])
    clickhouse.insert_ingest(client, db, writer, data, f"t:{db}")
    return [r[1] for r in clickhouse.quarantined_in_range(client, db, 0, 5, 5)]


CASES = [
    ("record_id", window(record_id="0" * 32), "record_id does not match (host_id, gpu_uuid, firm_id, window_start)"),
    ("other_host", window(host_id="P01-H02"), "window host_id differs from the batch host_id"),
    ("end_before_start", window(window_end=T0), "window_end <= window_start"),
    ("ancient", window(window_start=5_000, window_end=65_000, energy_joules=None), "window_start before 2000-01-01"),
    ("negative_seq", window(seq=-1), "seq < 0"),
    ("negative_alloc", window(allocated_seconds=-5, busy_seconds=None), "allocated_seconds < 0"),
    ("alloc_over_window", window(allocated_seconds=61, busy_seconds=None), "allocated_seconds > window length"),
    ("busy_over_alloc", window(busy_seconds=60.5), "busy_seconds outside [0, allocated_seconds]"),
    ("busy_nan", window(busy_seconds=math.nan), "busy_seconds outside [0, allocated_seconds]"),
    ("energy_h100", window(energy_joules=800.0 * 60 + 1), ENERGY),
    ("energy_l40s", window(gpu_class="L40S-48G", energy_joules=400.0 * 60 + 1), ENERGY),
    ("energy_negative", window(energy_joules=-1.0), ENERGY),
    ("future", window(window_start=LATE, window_end=LATE + 60_000), FUTURE),
]  # fmt: skip


@pytest.mark.parametrize(("w", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_rule_quarantines_with_its_reason(ch: tuple[Any, str], w: dict[str, Any], reason: str) -> None:
    client, db = ch
    good = window(gpu_uuid="GPU-ok")
    assert load(ch, [good, w]) == [reason]
    loaded = client.query(f"SELECT record_id FROM {db}.usage_raw").result_rows
    assert loaded == [(good["record_id"],)]  # the good window of the same batch still loads


def test_every_rule_has_a_case() -> None:
    assert {r for r, _ in WINDOW_CHECKS} - {c[2] for c in CASES} == {
        "batch host_id is not the signing key's host",
        "provider_id is not the registered provider of the host",
    }  # covered by test_signer_checks


def test_signer_checks(ch: tuple[Any, str]) -> None:
    assert load(ch, [window()], signer=("P01-H01", "P01")) == []
    assert load(ch, [window(seq=8, gpu_uuid="GPU-b")], signer=("P09-H09", "P09")) == [
        "batch host_id is not the signing key's host"
    ]


def test_provider_mismatch_is_quarantined(ch: tuple[Any, str]) -> None:
    assert load(ch, [window(provider_id="P02")], signer=("P01-H01", "P01")) == [
        "provider_id is not the registered provider of the host"
    ]


def test_unknown_gpu_class_uses_the_default_bound(ch: tuple[Any, str]) -> None:
    assert load(ch, [window(gpu_class="Mystery", energy_joules=1_400.0 * 60)]) == []


def test_loaded_row_keeps_partition_offset_and_values(ch: tuple[Any, str]) -> None:
    client, db = ch
    assert load(ch, [window()]) == []
    cols = "kafka_partition, kafka_offset, source, window_start, allocated_seconds, ingested_at"
    row = client.query(f"SELECT {cols} FROM {db}.usage_raw").result_rows[0]
    assert row[:3] == (0, 5, "kafka")
    assert row[3].replace(tzinfo=UTC) == datetime(2026, 3, 1, tzinfo=UTC)
    assert row[4] == 60
    assert row[5].replace(tzinfo=UTC) == datetime.fromtimestamp(1, UTC)
