"""Signatures that prove who sent what, on the real broker and chDB: Ed25519 batches verify under the
host's public key only; a rotation keeps the old key's backlog and nothing more; a revoked key
verifies nothing; a running loader takes a changed registry without a restart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from kafka import KafkaProducer

from gpumeter.record import encode_batch, public_key_text, record_id, signature_headers
from pipeline.keys import HostKey, KeyRegistry, RegistryFile, parse_registry, write_registry
from pipeline.loader import Loader, make_consumer
from pipeline.schema import (
    KEY_BACKLOG_REASON,
    KEY_FROM_REASON,
    KEY_LATE_REASON,
    KEY_NOT_YET_REASON,
    KEY_UNTIL_REASON,
)

pytestmark = pytest.mark.integration

HOST, PROVIDER = "P01-H01", "P01"
OLD, NEW = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
NOW = datetime.now(UTC).replace(microsecond=0)
SWITCH = NOW - timedelta(days=2)  # the rotation, two days ago
SWITCH_MS = int(SWITCH.timestamp() * 1000)


def window(gpu: str, start_ms: int) -> dict[str, Any]:
    start = start_ms // 60_000 * 60_000
    return {
        "record_id": record_id(HOST, gpu, "F0001", start), "seq": 0, "provider_id": PROVIDER, "host_id": HOST,
        "gpu_uuid": gpu, "gpu_class": "H100-80G", "firm_id": "F0001", "window_start": start,
        "window_end": start + 60_000, "allocated_seconds": 60, "busy_seconds": None, "energy_joules": None,
        "signature": None,
    }  # fmt: skip


def rotated() -> KeyRegistry:
    """The host's old key valid until SWITCH, its new one from then: what ``keys rotate`` writes."""
    return parse_registry({"hosts": {HOST: {"provider_id": PROVIDER, "keys": {
        "old": {"public_key": public_key_text(OLD.public_key()), "valid_until": SWITCH},
        "new": {"public_key": public_key_text(NEW.public_key()), "valid_from": SWITCH},
    }}}})  # fmt: skip


def send(bootstrap: str, topic: str, messages: list[tuple[bytes, list[tuple[str, bytes]]]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for value, headers in messages:
        producer.send(topic, value=value, headers=headers, partition=0)
    producer.flush()
    producer.close()


def signed(gpu: str, window_ms: int, made_ms: int, key_id: str, key: Any) -> tuple[bytes, list[tuple[str, bytes]]]:
    value = encode_batch(HOST, "test", [window(gpu, window_ms)], high_water_seq=0, made_at_ms=made_ms)
    return value, signature_headers(value, key_id, key)


def load(bootstrap: str, topic: str, ch: tuple[Any, str], keys: Any, expect: int) -> Loader:
    client, db = ch
    consumer = make_consumer(bootstrap, topic, "g-sig", fast_rebalance=True)
    loader = Loader(consumer, client, db, topic, keys=keys)
    try:
        loader.run(until=lambda s: s.messages >= expect, idle_timeout_s=30)
    finally:
        consumer.close(autocommit=False)
    return loader


def outcome(ch: tuple[Any, str]) -> dict[str, str]:
    """gpu_uuid -> 'loaded' or its quarantine reason."""
    client, db = ch
    got = {str(r[0]): "loaded" for r in client.query(f"SELECT DISTINCT gpu_uuid FROM {db}.usage_raw").result_rows}
    sql = f"SELECT if(record_id = '', '', JSONExtractString(raw, 'gpu_uuid')), reason FROM {db}.usage_quarantine"
    for gpu, reason in client.query(sql).result_rows:
        got[gpu or f"message:{reason}"] = str(reason)
    return got


def test_a_rotation_keeps_the_old_keys_backlog_and_nothing_more(
    kafka_bootstrap: str, topic: str, ch: tuple[Any, str]
) -> None:
    """Both keys are Ed25519; the loader's clock is now, two days after the switch."""
    before, after = SWITCH_MS - 3_600_000, SWITCH_MS + 3_600_000
    send(kafka_bootstrap, topic, [
        signed("GPU-backlog", before - 60_000, before, "old", OLD),  # spooled before the switch, sent now
        signed("GPU-new", after - 60_000, after, "new", NEW),
        signed("GPU-old-late", after - 60_000, after, "old", OLD),  # the old key after its end
        signed("GPU-new-early", before - 60_000, before, "new", NEW),  # the new key before its start
        # the old key (say, stolen) claims windows after the switch in a batch dated before it
        signed("GPU-backdated", after, before, "old", OLD),
        signed("GPU-forged", after - 60_000, after, "new", OLD),  # the old key's signature, the new key's id
    ])  # fmt: skip
    loader = load(kafka_bootstrap, topic, ch, rotated(), expect=6)
    assert outcome(ch) == {
        "GPU-backlog": "loaded",
        "GPU-new": "loaded",
        "GPU-old-late": KEY_UNTIL_REASON,
        "GPU-new-early": KEY_FROM_REASON,
        "GPU-backdated": KEY_LATE_REASON,
        "message:bad signature for key id 'new'": "bad signature for key id 'new'",
    }
    assert loader.stats.windows == 2


def test_messages_outside_their_keys_validity_do_not_count_for_the_host(
    kafka_bootstrap: str, topic: str, ch: tuple[Any, str]
) -> None:
    """agent_messages (what `pipeline gaps` reads for a live agent) takes only messages made inside
    their key's validity: an old key cannot keep a dead host looking alive, nor raise its high-water
    mark with a back-dated batch. A heartbeat so refused is quarantined whole, with its reason."""
    client, db = ch
    before, after = SWITCH_MS - 3_600_000, SWITCH_MS + 3_600_000
    late = encode_batch(HOST, "test", [], high_water_seq=5, made_at_ms=after)
    fine = encode_batch(HOST, "test", [], high_water_seq=7, made_at_ms=after)
    backdated = encode_batch(HOST, "test", [window("GPU-b", after)], high_water_seq=90, made_at_ms=before)
    send(kafka_bootstrap, topic, [
        (late, signature_headers(late, "old", OLD)),
        (fine, signature_headers(fine, "new", NEW)),
        (backdated, signature_headers(backdated, "old", OLD)),
    ])  # fmt: skip
    load(kafka_bootstrap, topic, ch, rotated(), expect=3)
    rows = client.query(f"SELECT high_water_seq FROM {db}.agent_messages").result_rows
    assert rows == [(7,)]
    assert outcome(ch) == {f"message:{KEY_UNTIL_REASON}": KEY_UNTIL_REASON, "GPU-b": KEY_LATE_REASON}


def test_a_key_not_valid_yet_or_retired_long_ago_verifies_nothing(
    kafka_bootstrap: str, topic: str, ch: tuple[Any, str]
) -> None:
    """The sender picks made_at; the loader's clock does not: a key scheduled for tomorrow signs
    nothing today, and a key retired 40 days ago (its backlog window is 30) signs nothing now."""
    now_ms = int(NOW.timestamp() * 1000)
    tomorrow, long_ago = NOW + timedelta(days=1), NOW - timedelta(days=40)
    keys = parse_registry({"hosts": {HOST: {"provider_id": PROVIDER, "keys": {
        "soon": {"public_key": public_key_text(NEW.public_key()), "valid_from": tomorrow},
        "gone": {"public_key": public_key_text(OLD.public_key()), "valid_until": long_ago},
    }}}})  # fmt: skip
    tomorrow_ms, gone_ms = int(tomorrow.timestamp() * 1000), int(long_ago.timestamp() * 1000)
    send(kafka_bootstrap, topic, [
        signed("GPU-soon", now_ms - 120_000, tomorrow_ms + 1000, "soon", NEW),  # dated into its validity
        signed("GPU-gone", gone_ms - 120_000, gone_ms - 60_000, "gone", OLD),  # dated into its validity
    ])  # fmt: skip
    load(kafka_bootstrap, topic, ch, keys, expect=2)
    assert outcome(ch) == {"GPU-soon": KEY_NOT_YET_REASON, "GPU-gone": KEY_BACKLOG_REASON}


def test_a_revoked_key_verifies_nothing_and_a_changed_registry_applies_without_a_restart(
    kafka_bootstrap: str, topic: str, ch: tuple[Any, str], tmp_path: Path
) -> None:
    path = tmp_path / "keys.toml"
    write_registry(path, rotated())
    watched = RegistryFile(path, every_s=0)
    send(kafka_bootstrap, topic, [signed("GPU-1", SWITCH_MS + 60_000, SWITCH_MS + 120_000, "new", NEW)])
    load(kafka_bootstrap, topic, ch, watched, expect=1)
    assert outcome(ch) == {"GPU-1": "loaded"}
    registry = watched.current()
    revoked = HostKey(**{**{f: getattr(registry.keys["new"], f) for f in HostKey.__slots__}, "revoked_at": NOW})
    write_registry(path, KeyRegistry({**registry.keys, "new": revoked}))
    send(kafka_bootstrap, topic, [signed("GPU-2", SWITCH_MS + 60_000, SWITCH_MS + 120_000, "new", NEW)])
    load(kafka_bootstrap, topic, ch, watched, expect=1)
    assert outcome(ch) == {"GPU-1": "loaded", "message:revoked signing key id 'new'": "revoked signing key id 'new'"}
    assert watched.reloads == 1
