"""Peak memory of one loader process on worst-case blocks: every message at the contract's limits
(500 windows, just under 1 MiB, signed and valid, so each goes the whole way into ClickHouse).

The loader cuts a block before the message that would take it over ``BLOCK_BYTES`` (16 MiB).
The baseline is the same loader with that bound lifted (blocks of 1000 offsets, as before), on the
same topic, each in a fresh child process with its own chDB path; the figure is the child's peak
RSS (``ru_maxrss``), chDB's own memory included.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from kafka import KafkaProducer

from gpumeter.demo.broker import LocalBroker, create_topic
from gpumeter.record import MAX_VALUE_BYTES, MAX_WINDOWS_PER_BATCH, encode_batch, record_id, signature_headers

MESSAGES = 150
SECRET = bytes.fromhex("5e" * 32)
HOST = "P01-H00"
T0 = int(datetime(2026, 3, 2, tzinfo=UTC).timestamp() * 1000)

CHILD = """
import resource, sys, time
from pipeline import clickhouse
from pipeline.keys import parse_registry
from pipeline.loader import Loader, make_consumer
bootstrap, topic, dsn, block_bytes, expect = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
client = clickhouse.connect(dsn, "mem")
clickhouse.ensure_schema(client, "mem")
keys = parse_registry({"hosts": {"P01-H00": {"provider_id": "P01", "keys": {"k0": "5e" * 32}}}})
consumer = make_consumer(bootstrap, topic, "mem-" + sys.argv[4], fast_rebalance=True)
loader = Loader(consumer, client, "mem", topic, keys=keys, block_bytes=block_bytes)
loader.run(until=lambda s: s.messages >= expect, idle_timeout_s=60)
assert loader.stats.quarantined == 0 and loader.stats.windows == expect * 500, loader.stats
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, loader.stats.inserts, flush=True)
"""


def message(n: int) -> bytes:
    """A valid batch of 500 windows whose GPU ids make it just under 1 MiB."""
    pad = "GPU-" + "x" * 1_930
    windows = []
    for i in range(MAX_WINDOWS_PER_BATCH):
        gpu = f"{pad}{n:04d}{i:03d}"
        start = T0 + n * 60_000
        windows.append({
            "record_id": record_id(HOST, gpu, "F0001", start), "seq": n * 500 + i, "provider_id": "P01",
            "host_id": HOST, "gpu_uuid": gpu, "gpu_class": "H100-80G", "firm_id": "F0001", "window_start": start,
            "window_end": start + 60_000, "allocated_seconds": 60, "busy_seconds": None, "energy_joules": None,
            "signature": None,
        })  # fmt: skip
    value = encode_batch(HOST, "bench", windows)
    assert MAX_VALUE_BYTES - 64 * 1024 < len(value) <= MAX_VALUE_BYTES, len(value)
    return value


def child_peak(bootstrap: str, topic: str, tmp: Path, block_bytes: int) -> tuple[int, int]:
    dsn = f"chdb://{tmp / f'ch-{block_bytes}'}"
    args = [sys.executable, "-c", CHILD, bootstrap, topic, dsn, str(block_bytes), str(MESSAGES)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rss, inserts = out.stdout.split()
    return int(rss), int(inserts)


def run() -> Iterator[str]:
    from pipeline.loader import BLOCK_BYTES

    with LocalBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        topic = f"bench-mem-{uuid.uuid4().hex[:6]}"
        create_topic(broker.bootstrap, topic, 1)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", max_request_size=2 * MAX_VALUE_BYTES)
        for n in range(MESSAGES):
            value = message(n)
            producer.send(topic, value=value, headers=signature_headers(value, "k0", SECRET))
        producer.flush()
        producer.close()
        bounded, bounded_inserts = child_peak(broker.bootstrap, topic, Path(tmp), BLOCK_BYTES)
        unbounded, unbounded_inserts = child_peak(broker.bootstrap, topic, Path(tmp), 2**40)
    yield (
        f"BENCH loader_worst_block_peak_rss_mb {bounded} MB vs unbounded_block {bounded / unbounded:.2f}x "
        f"({MESSAGES} messages of ~1 MiB; {bounded_inserts} vs {unbounded_inserts} inserts)"
    )


if __name__ == "__main__":
    for line in run():
        print(line, flush=True)
