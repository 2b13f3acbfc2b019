"""GPU windows (schema v4) through real Kafka and chDB: every second of every GPU's window accounted
for, checked at ingest (the identity) and against the usage windows (``pipeline coverage``)."""

from __future__ import annotations

import copy
import json
from datetime import timedelta
from typing import Any

import pytest
from test_end_to_end import START, measured
from test_pipeline_evolution import publish_and_load

from agent.runner import Agent, run_simulated
from agent.simulate import SimulatedFleet
from gpumeter.record import GPU_WINDOW_PARTS, encode_batch
from pipeline import clickhouse
from pipeline.coverage import coverage_table
from pipeline.requeue import pending
from pipeline.usage_store import UsageStore

pytestmark = pytest.mark.integration

DAY = (START, START + timedelta(days=1))


def metered(fleet: SimulatedFleet) -> list[tuple[str, list[dict[str, Any]], list[dict[str, Any]]]]:
    """(host_id, windows, GPU windows) of every batch the fleet's agents send, captured."""
    captured: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]]]] = []

    class Capture:
        def send(self, host_id: str, agent_version: str, windows: Any, gpu_windows: Any) -> None:
            captured.append((host_id, copy.deepcopy(list(windows)), copy.deepcopy(list(gpu_windows))))

    agents = [Agent(fleet.host_source(h.host_id), h, Capture(), 60, 20, 100) for h in fleet.hosts()]
    run_simulated(agents, fleet.start_s, fleet.end_s, 20)
    return captured


def fleet(seed: int) -> SimulatedFleet:
    return SimulatedFleet(seed=seed, start=START, days=1, providers=2, hosts_per_provider=1, gpus_per_host=2, firms=2)


def report(ch: tuple[Any, str]) -> tuple[list[tuple[Any, ...]], str, int]:
    client, db = ch
    store = UsageStore(client, db)
    rows = store.coverage(*DAY)
    return rows, *coverage_table(rows, store.uncovered(*DAY))


def test_every_second_of_every_gpu_is_accounted_and_ties_to_the_usage_windows(
    kafka_bootstrap: str, topic: str, ch: tuple[Any, str]
) -> None:
    f = fleet(5)
    captured = metered(f)
    values = [(host, encode_batch(host, "0.3.0", w, gpu_windows=g)) for host, w, g in captured]
    loader = publish_and_load(kafka_bootstrap, topic, ch, "g-cov", values)
    assert loader.stats.quarantined == 0
    assert measured(ch, "UTC") == f.ground_truth("UTC")  # billing reads the usage windows as before
    client, db = ch
    gpu_windows = [g for _, _, gs in captured for g in gs]
    assert {sum(g[k] for k in GPU_WINDOW_PARTS) for g in gpu_windows} == {60}  # what the agent sent adds up
    assert client.query(f"SELECT count() FROM {db}.gpu_windows").result_rows == [(len(gpu_windows),)]
    rows, text, problems = report(ch)
    assert problems == 0, text
    # per GPU: a whole day of windows, its capacity split exactly as the simulated jobs say
    assert len(rows) == len(f.gpus) == 4
    for _provider, host, gpu, _cls, windows, capacity, allocated, unattributed, idle, unread, unsampled, *_ in rows:
        assert windows == 1440 and capacity == 86_400
        assert allocated + unattributed + idle + unread + unsampled == capacity
        truth_held = sum(
            20 for t in range(f.start_s, f.end_s, 20) if f.job_at(gpu, t) is not None
        )  # each sample at t stands for [t, t + 20)
        assert allocated + unattributed == truth_held and idle == capacity - truth_held
        assert (unread, unsampled) == (0, 0)
        assert host in {h.host_id for h in f.hosts()}
    assert "every GPU window adds up" in text
    # one sequence numbers windows and GPU windows: none missing
    assert clickhouse.seq_gaps(client, db) == []


def test_lies_and_losses_in_gpu_windows_are_caught(kafka_bootstrap: str, topic: str, ch: tuple[Any, str]) -> None:
    f = fleet(6)
    captured = metered(f)
    # two batches from the middle of the day (their windows have neighbours on both sides)
    i0 = next(
        i for i in range(len(captured) // 3, len(captured)) if any(g["idle_seconds"] >= 20 for g in captured[i][2])
    )
    i1 = next(i for i in range(i0 + 1, len(captured)) if captured[i][1] and len(captured[i][2]) >= 2)
    (h0, _, g0), (h1, w1, g1) = captured[i0], captured[i1]
    lie = next(g for g in g0 if g["idle_seconds"] >= 20)
    lie["idle_seconds"] -= 20  # still adds up, but says a firm held 20 s that no usage window bills
    lie["allocated_seconds"] += 20
    broken = next(g for g in g0 if g is not lie)
    broken["idle_seconds"] += 1  # 61 seconds in a 60 s window: quarantined at ingest
    # and two forged ones beside it: off the window grid (it would overlap its neighbours), and
    # claiming more usage windows than a window can hold
    shifted = {**broken, "idle_seconds": broken["idle_seconds"] - 1, "window_start": broken["window_start"] + 1000,
               "window_end": broken["window_end"] + 1000}  # fmt: skip
    inflated = {**shifted, "window_start": broken["window_start"] + 300_000, "usage_windows": 61}
    inflated["window_end"] = inflated["window_start"] + 60_000
    g0.extend([shifted, inflated])
    orphan = w1[0]  # its usage window will have no GPU window beside it
    kept = [g for g in g1 if (g["gpu_uuid"], g["window_start"]) != (orphan["gpu_uuid"], orphan["window_start"])]
    dropped = next(g for g in g1 if g not in kept)
    values = [
        (h, encode_batch(h, "0.3.0", w, gpu_windows=kept if i == i1 else g)) for i, (h, w, g) in enumerate(captured)
    ]
    loader = publish_and_load(kafka_bootstrap, topic, ch, "g-cov-lies", values)
    client, db = ch
    # every usage window loaded and counted as loaded: a rejected GPU window is not a rejected message
    assert loader.stats.windows == sum(len(w) for _, w, _ in captured) and loader.stats.quarantined == 3
    quarantined = client.query(f"SELECT reason, raw, record_id FROM {db}.usage_quarantine ORDER BY raw").result_rows
    by_start = {json.loads(raw)["window_start"]: (reason, rid) for reason, raw, rid in quarantined}
    assert by_start == {
        broken["window_start"]: ("GPU window: its seconds do not add up to the window's length",
                                 f"gw:{broken['gpu_uuid']}:{broken['window_start']}"),
        shifted["window_start"]: ("GPU window: window_start is not a multiple of its length",
                                  f"gw:{broken['gpu_uuid']}:{shifted['window_start']}"),
        inflated["window_start"]: ("GPU window: usage_windows outside [0, window length]",
                                   f"gw:{broken['gpu_uuid']}:{inflated['window_start']}"),
    }  # fmt: skip
    assert list(pending(client, db)) == []  # not messages the loader rejected: nothing for requeue
    _, text, problems = report(ch)
    assert f"PROBLEM {h0} {lie['gpu_uuid']}: 1 GPU window(s) whose usage windows do not add up to them" in text
    for g in (broken, dropped):  # never loaded: a hole among the GPU's windows
        assert f"PROBLEM {g['host_id']} {g['gpu_uuid']}: 0.016667 h with no GPU window between" in text
    assert f"PROBLEM {h1} {orphan['gpu_uuid']}: 1 usage window(s) ({orphan['allocated_seconds'] / 3600:.6f} h)" in text
    # the quarantined GPU window leaves its usage windows (if any) with none beside them, and says so
    assert problems == 4 + (broken["usage_windows"] > 0), text
    gaps = clickhouse.seq_gaps(client, db)
    assert (h1, dropped["seq"], dropped["seq"]) in [g[:3] for g in gaps]
    assert (h0, broken["seq"], broken["seq"]) in [g[:3] for g in gaps]  # quarantined: never loaded


def test_v3_and_v4_writers_load_side_by_side_and_old_hosts_are_not_judged(
    kafka_bootstrap: str, topic: str, ch: tuple[Any, str], cli: Any
) -> None:
    f = fleet(7)
    captured = metered(f)
    old_host, upgraded = captured[0][0], next(h for h, _, _ in captured if h != captured[0][0])
    half = len(captured) // 2

    def encoded(n: int, h: str, w: Any, g: Any) -> bytes:
        if h == old_host or (h == upgraded and n < half):  # upgraded from 0.2.0 half way through the day
            return encode_batch(h, "0.2.0", w, version=3)
        return encode_batch(h, "0.3.0", w, gpu_windows=g)

    values = [(h, encoded(n, h, w, g)) for n, (h, w, g) in enumerate(captured)]
    loader = publish_and_load(kafka_bootstrap, topic, ch, "g-cov-v3", values)
    assert loader.stats.quarantined == 0
    assert measured(ch, "UTC") == f.ground_truth("UTC")
    rows, text, problems = report(ch)
    # before its first GPU window the upgraded host's usage windows are not judged (its agent was older)
    assert problems == 0, text
    assert old_host not in {r[1] for r in rows} and upgraded in {r[1] for r in rows}
    day = f"{START:%Y-%m-%d}"
    done = cli("pipeline", "coverage", "--from", day, "--to", day, "--strict")
    assert done.code == 0 and "every GPU window adds up" in done.out and "capacity_h" in done.out
    assert cli("pipeline", "coverage", "--from", "2026-03-02", "--to", "2026-03-01").code != 0
    # the provider statement shows where each GPU's capacity went: the same seconds, in hours
    provider, host = rows[0][0], rows[0][1]
    done = cli("billing", "provider-statement", "--provider", provider, "--month", f"{START:%Y-%m}", "--format", "csv")
    assert done.code == 0, done.err
    capacity = done.out.strip().split("\n\n")[-1].splitlines()
    assert capacity[0] == "host_id,gpu_uuid,gpu_class,capacity_hours,sold,unattributed,idle,outage_unread,unobserved"
    mine = [r for r in rows if r[0] == provider]
    assert capacity[1:] == [",".join([r[1], r[2], r[3], *(f"{x / 3600:.6f}" for x in r[5:11])]) for r in mine]
    assert host == mine[0][1]
