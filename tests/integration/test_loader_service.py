"""The loader as operators run it: ``gpumeter pipeline run`` in its own process, watched through its
metrics, and two of them in one consumer group sharing a topic through a rebalance. Embedded
ClickHouse is one process per data path, so each loader owns its own chDB path and a child process
reads each store afterwards; the union of the stores must hold every window exactly once."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kafka import KafkaProducer

from gpumeter.demo.broker import create_topic
from gpumeter.record import encode_batch, record_id, signature_headers

pytestmark = pytest.mark.integration

T0 = int(datetime(2026, 3, 2, tzinfo=UTC).timestamp() * 1000)
PROVIDER = "P01"
SECRET = secrets.token_bytes(32)
HOSTS = [f"P01-H{n:02d}" for n in range(8)]

READ = """
import json, sys
from pipeline import clickhouse
client = clickhouse.connect(sys.argv[1], "gpumeter")
rows = client.query("SELECT record_id, count() FROM gpumeter.usage_raw GROUP BY record_id").result_rows
print(json.dumps({r[0]: r[1] for r in rows}))
"""


def keys_file(path: Path) -> Path:
    lines = []
    for host in HOSTS:
        lines += [
            f'[hosts."{host}"]',
            f'provider_id = "{PROVIDER}"',
            f'keys = {{ "{host}.k1" = "{SECRET.hex()}" }}',
            "",
        ]
    path.write_text("\n".join(lines))
    path.chmod(0o600)
    return path


def produce(bootstrap: str, topic: str, first_minute: int, batches: int) -> set[str]:
    """``batches`` signed batches of 5 windows per host, keyed by host; returns their record ids."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    ids = set()
    for host in HOSTS:
        for b in range(batches):
            ws = []
            for m in range(first_minute + b * 5, first_minute + b * 5 + 5):
                start = T0 + m * 60_000
                rid = record_id(host, "GPU-0", "F0001", start)
                ids.add(rid)
                ws.append({"record_id": rid, "seq": m, "provider_id": PROVIDER, "host_id": host, "gpu_uuid": "GPU-0",
                           "gpu_class": "H100-80G", "firm_id": "F0001", "window_start": start,
                           "window_end": start + 60_000, "allocated_seconds": 60, "busy_seconds": None,
                           "energy_joules": None, "signature": None})  # fmt: skip
            value = encode_batch(host, "test", ws)
            producer.send(topic, key=host.encode(), value=value, headers=signature_headers(value, f"{host}.k1", SECRET))
    producer.flush()
    producer.close()
    return ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loader(bootstrap: str, topic: str, home: Path, keys: Path, *extra: str) -> subprocess.Popen[str]:
    env = dict(os.environ, GPUMETER_HOME=str(home), GPUMETER_CLICKHOUSE_DSN=f"chdb://{home / 'ch'}")
    args = ["pipeline", "run", "--kafka", bootstrap, "--topic", topic, "--keys", str(keys), "--group", "g-service",
            "--rebalance-timeout", "8", "--dead-letter-topic", "-", *extra]  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", "from gpumeter.cli import main; main()", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip


def stored(home: Path) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", READ, f"chdb://{home / 'ch'}"], capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    got: dict[str, int] = json.loads(out.stdout)
    return got


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def wait_for(proc: subprocess.Popen[str], port: int, pattern: str, timeout_s: float = 90, unless: str = "") -> str:
    """The first scrape in which ``pattern`` matches (and ``unless``, if given, does not)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        try:
            last = scrape(port)
        except OSError:
            last = ""
        if re.search(pattern, last, re.M) and not (unless and re.search(unless, last, re.M)):
            return last
        time.sleep(0.5)
    raise AssertionError(f"{pattern!r} never appeared in the metrics:\n{last}")


def test_a_loader_service_shows_its_progress_in_its_metrics_and_textfile(kafka_bootstrap: str, tmp_path: Path) -> None:
    topic = f"svc-{secrets.token_hex(4)}"
    create_topic(kafka_bootstrap, topic, partitions=2)
    ids = produce(kafka_bootstrap, topic, 0, 2)
    port, textfile = free_port(), tmp_path / "loader.prom"
    proc = loader(kafka_bootstrap, topic, tmp_path, keys_file(tmp_path / "keys.toml"), "--idle-exit", "6",
                  "--metrics-port", str(port), "--metrics-textfile", str(textfile))  # fmt: skip
    try:
        wait_for(proc, port, f"^gpumeter_loader_windows_loaded_total {len(ids)}$")
        # lag is measured at each poll and after each commit; once everything is loaded it settles at 0
        wait_for(proc, port, r'^gpumeter_loader_lag_messages\{partition="[01]",topic="svc-\w+"\} 0$', 20,
                 unless=r"^gpumeter_loader_lag_messages\{.*\} [1-9]")  # fmt: skip
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    final = textfile.read_text()
    assert f"gpumeter_loader_windows_loaded_total {len(ids)}" in final and "gpumeter_loader_stopped 0" in final
    commit = next(line for line in final.splitlines() if line.startswith("gpumeter_loader_last_commit_timestamp"))
    assert abs(float(commit.split()[1]) - time.time()) < 120
    assert set(stored(tmp_path)) == ids


def test_two_loaders_in_one_group_share_the_topic_through_a_rebalance(kafka_bootstrap: str, tmp_path: Path) -> None:
    """The first loader takes every partition; the second joins mid-stream and the group splits them.
    Each stores what it loaded in its own chDB path; together they hold every window, and each
    store counts each of its windows once."""
    topic = f"svc-{secrets.token_hex(4)}"
    create_topic(kafka_bootstrap, topic, partitions=4)
    keys = keys_file(tmp_path / "keys.toml")
    ids = produce(kafka_bootstrap, topic, 0, 2)
    homes = [tmp_path / "a", tmp_path / "b"]
    ports = [free_port(), free_port()]
    procs: list[subprocess.Popen[str]] = []
    try:
        procs.append(
            loader(kafka_bootstrap, topic, homes[0], keys, "--idle-exit", "25", "--metrics-port", str(ports[0]))
        )
        wait_for(procs[0], ports[0], f"^gpumeter_loader_windows_loaded_total {len(ids)}$")
        procs.append(
            loader(kafka_bootstrap, topic, homes[1], keys, "--idle-exit", "25", "--metrics-port", str(ports[1]))
        )
        wait_for(procs[1], ports[1], "^gpumeter_loader_assigned_partitions [1-9]")  # the group split the topic
        wait_for(procs[0], ports[0], "^gpumeter_loader_assigned_partitions [1-3]$")
        ids |= produce(kafka_bootstrap, topic, 100, 4)
        results = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    got = [stored(home) for home in homes]
    assert got[0] and got[1], "both loaders loaded windows"
    assert set(got[0]) | set(got[1]) == ids  # none lost, none invented (a replayed one may be in both)


def test_a_loader_with_no_broker_says_so_in_one_plain_line_and_stops_cleanly(tmp_path: Path) -> None:
    """No broker at the address: instead of kafka-python's four log lines per attempt (every few
    seconds, naming ``bootstrap-0``) and a traceback after 30 s, one line per retry names the
    address, the retries back off, and a stop request ends it with exit 0."""
    port = free_port()  # nothing listens there
    env = dict(os.environ, GPUMETER_HOME=str(tmp_path), GPUMETER_CLICKHOUSE_DSN=f"chdb://{tmp_path / 'ch'}")
    args = ["pipeline", "run", "--kafka", f"127.0.0.1:{port}", "--topic", "t", "--insecure"]
    proc = subprocess.Popen([sys.executable, "-c", "from gpumeter.cli import main; main()", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stderr is not None
    seen = []
    while len([ln for ln in seen if "cannot reach Kafka" in ln]) < 2:  # the first try and the first retry
        line = proc.stderr.readline()
        assert line, f"the loader ended early: {seen}"
        seen.append(line)
    proc.send_signal(2)
    _, rest = proc.communicate(timeout=60)
    err = "".join(seen) + rest
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "kafka.net" not in err and "bootstrap-0" not in err
    lines = [ln for ln in err.splitlines() if "cannot reach Kafka" in ln]
    assert [ln.split(" WARNING gpumeter.kafka ")[-1] for ln in lines] == [
        f"cannot reach Kafka at 127.0.0.1:{port} (connection refused); retrying in 5 s",
        f"cannot reach Kafka at 127.0.0.1:{port} (connection refused); retrying in 10 s",
    ]
    assert "stopped before Kafka could be reached; nothing consumed" in err
