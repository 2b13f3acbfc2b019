"""Every window check runs in ClickHouse (the ingest views); each rule fires with its own reason."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import pytest
from billing_helpers import USAGE_HEADER, Cli

from gpumeter.record import encode_batch, record_id
from pipeline import clickhouse
from pipeline.framing import Framed, container, shipped_versions, split_value
from pipeline.schema import FUTURE_TOLERANCE_S, WINDOW_CHECKS

pytestmark = pytest.mark.integration

T0 = 1_772_323_200_000  # 2026-03-01T00:00:00Z
SENT = T0 + 120_000  # the Kafka message timestamp, and the loader's clock unless a test says otherwise
LATE = SENT + FUTURE_TOLERANCE_S * 1000  # a window starting here ends beyond the tolerance
ENERGY = "energy_joules above what the GPU class can draw"
FUTURE = f"window_end more than {FUTURE_TOLERANCE_S} s after the loader's clock"


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
    ch: tuple[Any, str],
    windows: list[dict[str, Any]],
    batch_host: str = "P01-H01",
    signer: tuple[str, str] = ("", ""),
    sent_ms: int = SENT,
    loader_ms: int = SENT,
) -> list[str]:
    client, db = ch
    writer, body = split_value(encode_batch(batch_host, "test", windows), shipped_versions())
    data = container(writer, 0, loader_ms * 1000, [Framed(5, sent_ms, body, *signer)])
    clickhouse.insert_ingest(client, db, writer, data, f"t:{db}")
    return [r[1] for r in clickhouse.quarantined_in_range(client, db, 0, 5, 5, "")]


CASES = [
    ("record_id", window(record_id="0" * 32), "record_id does not match (host_id, gpu_uuid, firm_id, window_start)"),
    ("other_host", window(host_id="P01-H02"), "window host_id differs from the batch host_id"),
    ("end_before_start", window(window_end=T0), "window_end <= window_start"),
    ("ancient", window(window_start=5_000, window_end=65_000, energy_joules=None), "window_start before 2000-01-01"),
    ("negative_seq", window(seq=-1), "seq < 0"),
    ("negative_alloc", window(allocated_seconds=-5, busy_seconds=None), "allocated_seconds < 0"),
    ("alloc_over_window", window(allocated_seconds=61, busy_seconds=None), "allocated_seconds > window length"),
    # x 1000 wraps around Int64 to a small number: once passed the check and was stored as 4,000,000,000 s
    ("alloc_wraps", window(allocated_seconds=9_223_373_253_715_968, busy_seconds=None),
     "allocated_seconds > window length"),
    # once stored, after a cast to 32 bits, as 4,000,000,000 s: one line of 11 million CNY
    ("alloc_4e9", window(window_end=T0 + 4 * 10**12, allocated_seconds=4 * 10**9, busy_seconds=None,
                         energy_joules=None), FUTURE),
    ("longer_than_a_day", window(window_start=T0 - 86_400_001, allocated_seconds=60, busy_seconds=None,
                                 energy_joules=None), "window longer than a day"),
    ("firm_formula", window(firm_id="=HYPERLINK(1)"),
     "firm_id is not a firm id (letters, digits, then . _ -; at most 64)"),
    ("samples_over_alloc", window(samples_taken=61), "samples_taken outside [0, allocated_seconds]"),
    ("samples_negative", window(samples_taken=-1), "samples_taken outside [0, allocated_seconds]"),
    ("samples_over_window", window(samples_taken=60, samples_missed=1),
     "samples_taken + samples_missed above the window's seconds"),
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


@pytest.mark.parametrize("sent_ms", [0, LATE + 10**9])
def test_the_producer_timestamp_cannot_make_a_future_window_pass(ch: tuple[Any, str], sent_ms: int) -> None:
    # an unsigned value: absent (0) or far ahead, it once let any window through
    assert load(ch, [window(window_start=LATE, window_end=LATE + 60_000)], sent_ms=sent_ms) == [FUTURE]


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
    assert row[5].replace(tzinfo=UTC) == datetime.fromtimestamp(SENT / 1000, UTC)  # the loader's clock


def csv_line(w: dict[str, Any]) -> str:
    def iso(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat()

    def num(x: float | None) -> str:
        return "" if x is None else repr(x)

    return (
        f"{w['record_id']},{iso(w['window_start'])},{iso(w['window_end'])},{w['provider_id']},{w['host_id']},"
        f"{w['gpu_uuid']},{w['gpu_class']},{w['firm_id']},{w['allocated_seconds']},{num(w['busy_seconds'])},"
        f"{num(w['energy_joules'])}"
    )


# what a CSV row cannot say: a batch of other hosts (the row is its own batch), a sequence number
# (imports carry 0), NaN (not a plain decimal), sample counts (no such columns); the signer rules need a signature
NOT_IN_CSV = {"other_host", "negative_seq", "busy_nan", "samples_over_alloc", "samples_negative", "samples_over_window"}


@pytest.mark.parametrize(
    ("w", "reason"),
    [c[1:] for c in CASES if c[0] not in NOT_IN_CSV],
    ids=[c[0] for c in CASES if c[0] not in NOT_IN_CSV],
)
def test_a_csv_row_the_loader_quarantines_is_refused_by_usage_import(
    ch: tuple[Any, str], cli: Cli, w: dict[str, Any], reason: str
) -> None:
    client, db = ch
    sent_ms = SENT
    if reason == FUTURE:  # an import's own clock is the message time: a window beyond now + tolerance
        now_ms = int(datetime.now(UTC).timestamp()) * 1000
        sent_ms, start = now_ms, now_ms + (FUTURE_TOLERANCE_S + 60) * 1000
        w = window(window_start=start, window_end=start + 60_000)
    good = window(gpu_uuid="GPU-ok")
    path = cli.file("usage.csv", "\n".join([USAGE_HEADER, csv_line(good), csv_line(w)]) + "\n")
    r = cli("usage", "import", path)
    assert r.code == 1
    assert f"{path} refused, nothing written:\n{path}:3: {reason}" in r.err
    assert client.query(f"SELECT count() FROM {db}.usage_raw").result_rows == [(0,)]  # not even the good row
    # the same window through Kafka: quarantined, same reason
    assert load(ch, [w], sent_ms=sent_ms, loader_ms=sent_ms) == [reason]
    assert cli("usage", "import", cli.file("good.csv", f"{USAGE_HEADER}\n{csv_line(good)}\n")).code == 0


def test_csv_rows_that_pass_the_checks_load(ch: tuple[Any, str], cli: Cli) -> None:
    client, db = ch
    rows = [csv_line(window(gpu_uuid=f"GPU-{n}", allocated_seconds=n, busy_seconds=None)) for n in (0, 1, 60)]
    cli.ok("usage", "import", cli.file("usage.csv", "\n".join([USAGE_HEADER, *rows]) + "\n"))
    assert client.query(f"SELECT sum(allocated_seconds), count() FROM {db}.usage_raw").result_rows == [(61, 3)]
