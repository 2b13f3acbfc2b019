"""kill -9 a loader process mid-run, restart it: billed totals equal the ground truth.

Embedded ClickHouse allows one process per data path, so the loader runs in child
processes that own their own chDB path; the second child reports the totals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_end_to_end import START, meter_fleet

from agent.simulate import SimulatedFleet

pytestmark = pytest.mark.integration

CHILD = """
import json, sys
from pipeline.usage_store import UsageStore
from pipeline import clickhouse
from kafka import KafkaConsumer
from pipeline.loader import Loader, consumer_config
bootstrap, topic, dsn, expect = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = clickhouse.connect(dsn, "drill")
clickhouse.ensure_schema(client, "drill")
config = consumer_config("g-kill", fast_rebalance=True)
config.update(max_poll_interval_ms=4000, session_timeout_ms=4000)  # the dead member leaves sooner
consumer = KafkaConsumer(bootstrap_servers=bootstrap, **config)
loader = Loader(consumer, client, "drill", topic, block_offsets=7, linger_s=0.05)
while loader.stats.commits == 0 or expect < 0:
    loader.poll_once()
    if expect < 0 and loader.stats.commits:
        print("committed", flush=True)   # the parent kills us now, mid-way through the topic
if expect >= 0:
    loader.run(idle_timeout_s=4)
    rows = UsageStore(client, "drill").gpu_seconds_by_day("UTC")
    print(json.dumps({"totals": [[f, d.isoformat(), p, c, s] for f, d, p, c, s, _ in rows],
                      "stats": loader.stats.messages}), flush=True)
"""


def test_kill_dash_nine_mid_run_then_restart(kafka_bootstrap: str, topic: str, tmp_path: Path) -> None:
    fleet = SimulatedFleet(seed=31, start=START, days=2, providers=2, hosts_per_provider=1, gpus_per_host=2, firms=3)
    sink = meter_fleet(kafka_bootstrap, topic, fleet)
    dsn = f"chdb://{tmp_path / 'ch'}"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = [sys.executable, "-c", CHILD, kafka_bootstrap, topic, dsn]
    first = subprocess.Popen([*args, "-1"], stdout=subprocess.PIPE, text=True, env=env)
    assert first.stdout is not None
    assert first.stdout.readline().strip() == "committed"
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert first.returncode == -signal.SIGKILL
    second = subprocess.run([*args, "0"], capture_output=True, text=True, env=env, timeout=120)
    assert second.returncode == 0, second.stderr[-2000:]
    report = json.loads(second.stdout.strip().splitlines()[-1])
    assert 0 < report["stats"] < sink.messages_sent + 1  # resumed from the first child's commits
    got = {(f, d, p, c): s for f, d, p, c, s in report["totals"]}
    truth = {(f, d.isoformat(), p, c): s for (f, d, p, c), s in fleet.ground_truth("UTC").items()}
    assert got == truth
