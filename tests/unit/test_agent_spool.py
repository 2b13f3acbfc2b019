"""The spool and the checkpointed agent: durable before sent, crash at any step, bounded, in order."""

from __future__ import annotations

import itertools
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.runner import Agent
from agent.sender import SpoolSender
from agent.simulate import SimulatedFleet
from agent.spool import Spool, SpoolError, decode_file, encode_file
from gpumeter.record import GPU_WINDOW_PARTS, decode_batch, verify

KEY = ("host-key-1", bytes(range(32)))
START = datetime(2026, 3, 1, tzinfo=UTC)


def fleet() -> SimulatedFleet:
    return SimulatedFleet(seed=4, start=START, days=1, providers=1, hosts_per_provider=1, gpus_per_host=3,
                          quantum_s=1, mean_job_s=20)  # fmt: skip


def spooled_agent(root: Path, f: SimulatedFleet, **spool_kw: Any) -> tuple[Agent, Spool]:
    spool = Spool(root, signing_key=KEY, **spool_kw)
    host = f.hosts()[0]
    return Agent(f.host_source(host.host_id), host, spool, window_s=10, interval_s=1, checkpoint=spool), spool


def all_windows(spool: Spool, kind: str = "windows") -> list[dict[str, Any]]:
    """Every spooled window (``kind="gpu_windows"``: GPU window), signatures checked."""
    out = []
    for e in spool.pending(10_000):
        value, headers, _ = spool.read(e)
        assert verify(value, headers, {KEY[0]: KEY[1]}) == KEY[0]
        out.extend(decode_batch(value)[kind])  # type: ignore[literal-required]
    return out


def all_seqs(spool: Spool) -> list[int]:
    """The seqs of every spooled window and GPU window, sorted: one sequence for both."""
    return sorted(int(w["seq"]) for kind in ("windows", "gpu_windows") for w in all_windows(spool, kind))


def truth(f: SimulatedFleet, instants: list[int], window_s: int = 10) -> dict[tuple[str, str, int], int]:
    out: dict[tuple[str, str, int], int] = {}
    for g in f.gpus:
        for t in instants:
            job = f.job_at(g.gpu_uuid, t)
            if job:
                key = (g.gpu_uuid, job.firm_id, t - t % window_s)
                out[key] = out.get(key, 0) + 1
    return out


def test_file_format_round_trips_and_detects_tearing() -> None:
    data = encode_file({"first_seq": 1}, b"value")
    assert decode_file(data) == ({"first_seq": 1}, b"value")
    for cut in (len(data) - 1, len(data) // 2, 5):
        with pytest.raises(SpoolError, match=r"checksum|bad magic|length"):
            decode_file(data[:cut])


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=4))
def test_restarts_at_any_sample_lose_nothing_and_never_count_twice(tmp_path_factory: Any, runs: list[int]) -> None:
    """Kill the agent (drop it without stop) after each run of samples; every sampled instant is counted once."""
    root = tmp_path_factory.mktemp("spool")
    f = fleet()
    t = f.start_s
    instants = []
    for n in runs:
        meter, _ = spooled_agent(root, f)
        for _ in range(n):
            meter.sample(t)
            instants.append(t)
            t += 1
        t += 3  # the agent was down for 3 s: those instants are not sampled
    meter, spool = spooled_agent(root, f)
    meter.sample(t + 100)  # far later: closes every restored window
    windows = [w for w in all_windows(spool) if w["window_start"] // 1000 <= instants[-1]]
    got = {(w["gpu_uuid"], w["firm_id"], w["window_start"] // 1000): w["allocated_seconds"] for w in windows}
    assert got == truth(f, instants)
    assert len({w["record_id"] for w in windows}) == len(windows)
    assert all_seqs(spool) == list(range(len(all_seqs(spool))))
    # every second of every GPU window accounted once, across the kills: sampled instants as held or
    # idle, the rest (before the first start, the 3 s downtimes, after the last instant) unsampled
    gpu_windows = {(g["gpu_uuid"], g["window_start"] // 1000): g for g in all_windows(spool, "gpu_windows")}
    last = instants[-1] - instants[-1] % 10
    every = {(g.gpu_uuid, w) for g in f.gpus for w in range(f.start_s, last + 1, 10)}
    assert {k for k in gpu_windows if k[1] <= last} == every
    for (gpu, ws), g in gpu_windows.items():
        assert sum(g[k] for k in GPU_WINDOW_PARTS) == 10
        sampled = [t for t in instants if ws <= t < ws + 10]
        held = sum(1 for t in sampled if f.job_at(gpu, t))
        assert (g["allocated_seconds"] + g["unattributed_seconds"], g["idle_seconds"]) == (held, len(sampled) - held)
        assert g["unread_seconds"] == 0 and g["unsampled_seconds"] == 10 - len(sampled)
        assert g["usage_windows"] == sum(1 for k in got if k[0] == gpu and k[2] == ws)


def test_crash_after_the_batch_is_durable_but_before_the_checkpoint_does_not_reopen_it(tmp_path: Path) -> None:
    f = fleet()
    meter, spool = spooled_agent(tmp_path, f)
    for t in range(f.start_s, f.start_s + 10):
        meter.sample(t)
    stale = (tmp_path / "checkpoint.json").read_bytes()
    meter.sample(f.start_s + 10)  # closes window 0: batch written, then checkpoint
    (tmp_path / "checkpoint.json").write_bytes(stale)  # as if killed between the two
    meter2, spool2 = spooled_agent(tmp_path, f)
    meter2.sample(f.start_s + 20)
    assert spool.next_seq <= spool2.next_seq
    windows = all_windows(spool2)
    assert len({w["record_id"] for w in windows}) == len(windows)  # window 0 once only
    assert all_seqs(spool2) == list(range(len(all_seqs(spool2))))
    gpu_windows = all_windows(spool2, "gpu_windows")
    assert len({(g["gpu_uuid"], g["window_start"]) for g in gpu_windows}) == len(gpu_windows) == 6  # once only
    # the sample at +10 was lost with the checkpoint it was in: window 10 says it was not sampled
    later = [g for g in gpu_windows if g["window_start"] // 1000 == f.start_s + 10]
    assert [g["unsampled_seconds"] for g in later] == [10, 10, 10]


def test_a_torn_batch_is_quarantined_and_a_leftover_tmp_removed_never_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = fleet()
    meter, spool = spooled_agent(tmp_path, f)
    for t in range(f.start_s, f.start_s + 31):
        meter.sample(t)
    entries = spool.pending()
    assert len(entries) == 3
    data = entries[-1].path.read_bytes()
    entries[-1].path.write_bytes(data[: len(data) // 2])
    (tmp_path / "batches" / "0000000000000099.batch.tmp").write_bytes(b"half")
    with caplog.at_level(logging.ERROR, "gpumeter.agent.spool"):
        reopened = Spool(tmp_path)
    assert [e.first_seq for e in reopened.pending()] == [e.first_seq for e in entries[:2]]
    assert reopened.quarantined == 1 and (tmp_path / "quarantine" / entries[-1].path.name).exists()
    assert not list((tmp_path / "batches").glob("*.tmp"))
    assert "quarantined" in caplog.text and "checksum mismatch" in caplog.text
    assert reopened.next_seq == max(e.last_seq for e in entries) + 1  # the sequence never goes back


def test_full_spool_refuses_new_windows_loudly_and_keeps_the_old(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = fleet()
    meter, spool = spooled_agent(tmp_path, f, max_bytes=1500)
    with caplog.at_level(logging.ERROR, "gpumeter.agent.spool"):
        for t in range(f.start_s, f.start_s + 101):
            meter.sample(t)
    kept = spool.pending()
    assert kept and kept[0].first_seq == 0  # the oldest stay
    assert spool.depth_bytes <= 1500
    assert spool.windows_dropped > 0
    assert spool.windows_dropped + spool.depth_windows == meter.windows_closed
    assert "spool FULL" in caplog.text and "REFUSED" in caplog.text
    assert spool.next_seq == meter.acc.next_seq  # refused windows used their seq: the gap is visible


class FakeKafka:
    """acks per message from a script: True = acknowledged, False = not."""

    def __init__(self, script: list[bool]) -> None:
        self.script = script
        self.queued: list[tuple[str, bytes, list[tuple[str, bytes]], int]] = []
        self.delivered: list[bytes] = []

    def send_framed(self, host_id: str, value: bytes, headers: list[tuple[str, bytes]], windows: int) -> None:
        self.queued.append((host_id, value, headers, windows))

    def flush_each(self, timeout_s: float = 30.0) -> list[BaseException | None]:
        out: list[BaseException | None] = []
        for q in self.queued:
            ok = self.script.pop(0) if self.script else True
            if ok:
                self.delivered.append(q[1])
            out.append(None if ok else TimeoutError("no ack"))
        self.queued = []
        return out

    def close(self) -> None:
        pass


def test_sender_deletes_only_what_was_acknowledged_and_keeps_order(tmp_path: Path) -> None:
    f = fleet()
    meter, spool = spooled_agent(tmp_path, f)
    for t in range(f.start_s, f.start_s + 41):
        meter.sample(t)
    before = [e.first_seq for e in spool.pending()]
    kafka = FakeKafka([True, False, True, True])
    sender = SpoolSender(spool, lambda: kafka)
    assert sender.drain_once() == "failed"
    assert [e.first_seq for e in spool.pending()] == [before[1]]
    assert sender.send_errors == 1
    assert sender.drain_once() == "sent"
    assert spool.pending() == [] and sender.drain_once() == "idle"
    batches = [decode_batch(v) for v in kafka.delivered]
    seqs = [w["seq"] for b in batches for w in (*b["windows"], *b["gpu_windows"])]
    assert sorted(seqs) == list(range(meter.acc.next_seq))  # every window and GPU window, once


def test_sender_survives_no_broker_at_all(tmp_path: Path) -> None:
    f = fleet()
    meter, spool = spooled_agent(tmp_path, f)
    for t in range(f.start_s, f.start_s + 11):
        meter.sample(t)

    def no_broker() -> FakeKafka:
        raise ConnectionRefusedError("no broker")

    sender = SpoolSender(spool, no_broker)
    assert sender.drain_once() == "failed"
    assert spool.depth_batches == 1 and sender.last_error == "ConnectionRefusedError: no broker"


def test_graceful_stop_saves_open_windows_instead_of_closing_them_early(tmp_path: Path) -> None:
    f = fleet()
    meter, spool = spooled_agent(tmp_path, f)
    for t in range(f.start_s, f.start_s + 5):
        meter.sample(t)
    meter.stop()
    assert spool.pending() == []  # nothing closed early: a partial window would clash with its later self
    meter2, spool2 = spooled_agent(tmp_path, f)
    for t in range(f.start_s + 5, f.start_s + 11):
        meter2.sample(t)
    windows = all_windows(spool2)
    assert sum(w["allocated_seconds"] for w in windows) == sum(
        truth(f, list(range(f.start_s, f.start_s + 10))).values()
    )


def test_an_idle_sender_heartbeats_the_high_water_mark_a_busy_one_does_not(tmp_path: Path) -> None:
    """Every batch says the highest seq numbered so far; with the spool empty and nothing sent for a
    minute, a signed heartbeat of no windows says it again, so the pipeline sees a lost tail and an
    idle agent apart from a dead one."""
    f = fleet()
    meter, spool = spooled_agent(tmp_path, f)
    for t in range(f.start_s, f.start_s + 21):
        meter.sample(t)
    now = [0.0]
    kafka = FakeKafka([])
    made: list[tuple[str, bytes, list[tuple[str, bytes]]]] = []

    def heartbeat() -> tuple[str, bytes, list[tuple[str, bytes]]]:
        made.append(("h", *spool.heartbeat("h", "t")))
        return made[-1]

    sender = SpoolSender(spool, lambda: kafka, heartbeat=heartbeat, heartbeat_s=60, clock=lambda: now[0])
    assert sender.drain_once() == "sent"
    batches = [decode_batch(v) for v in kafka.delivered]
    highest = [max(w["seq"] for w in (*b["windows"], *b["gpu_windows"])) for b in batches]
    assert [b["high_water_seq"] for b in batches] == highest
    now[0] = 59.0
    assert sender.beat_once() == "idle" and len(kafka.delivered) == len(batches)  # sent something 59 s ago
    now[0] = 61.0
    assert sender.beat_once() == "sent" and sender.heartbeats_sent == 1
    beat = decode_batch(kafka.delivered[-1])
    assert beat["windows"] == beat["gpu_windows"] == []
    assert beat["high_water_seq"] == meter.acc.next_seq - 1 == spool.next_seq - 1
    assert made[-1][1] == kafka.delivered[-1] and verify(made[-1][1], made[-1][2], {KEY[0]: KEY[1]}) == KEY[0]
    assert sender.beat_once() == "idle"  # the next one is due a minute later


def test_a_crash_after_a_gap_was_spooled_does_not_send_its_gap_windows_again(tmp_path: Path) -> None:
    """Down for 100 s, then one sample closes the open window and the gap's wholly unsampled windows;
    killed before the checkpoint was saved, the next start must not close that gap a second time."""
    f = fleet()
    meter, _ = spooled_agent(tmp_path, f)
    for t in range(f.start_s, f.start_s + 5):
        meter.sample(t)
    stale = (tmp_path / "checkpoint.json").read_bytes()
    meter.sample(f.start_s + 105)  # window 0 and the gap's windows 10..90 closed and spooled
    (tmp_path / "checkpoint.json").write_bytes(stale)  # as if killed before the checkpoint save
    meter2, spool2 = spooled_agent(tmp_path, f)
    meter2.sample(f.start_s + 106)
    meter2.sample(f.start_s + 115)  # closes window 100
    gpu_windows = all_windows(spool2, "gpu_windows")
    keys = [(g["gpu_uuid"], g["window_start"] // 1000 - f.start_s) for g in gpu_windows]
    assert len(set(keys)) == len(keys)  # each GPU window once
    assert sorted({k[1] for k in keys}) == list(range(0, 110, 10))
    window_100 = [g for g in gpu_windows if g["window_start"] // 1000 == f.start_s + 100]
    # sampled at 105 by the lost run (its state went with the checkpoint) and 106: 105 is unsampled now
    assert {sum(g[k] for k in GPU_WINDOW_PARTS) for g in gpu_windows} == {10}
    assert [g["unsampled_seconds"] for g in window_100] == [9, 9, 9]
    assert all_seqs(spool2) == list(range(len(all_seqs(spool2))))


@pytest.mark.parametrize(("window_s", "interval_s"), [(10, 2), (30, 1)])
def test_a_new_cadence_after_a_restart_never_accounts_a_second_twice(
    tmp_path: Path, window_s: int, interval_s: int
) -> None:
    """The open window closes under the old cadence (10 s windows, 1 s samples); the new one samples
    again from its first window after it, so no two GPU windows of a GPU overlap."""
    f = fleet()
    meter, spool = spooled_agent(tmp_path, f)
    for t in range(f.start_s, f.start_s + 14):
        meter.sample(t)
    meter.stop()  # window 10 open, saved
    host = f.hosts()[0]
    meter2 = Agent(f.host_source(host.host_id), host, spool, window_s=window_s, interval_s=interval_s,
                   checkpoint=spool)  # fmt: skip
    for t in range(f.start_s + 14, f.start_s + 100, interval_s):
        meter2.sample(t)
    assert meter2.acc.samples_rejected > 0  # the rest of window 10, and up to the next new window
    spans: dict[str, list[tuple[int, int]]] = {}
    for g in all_windows(spool, "gpu_windows"):
        assert sum(g[k] for k in GPU_WINDOW_PARTS) * 1000 == g["window_end"] - g["window_start"]
        spans.setdefault(g["gpu_uuid"], []).append((g["window_start"], g["window_end"]))
    for runs in spans.values():
        runs.sort()
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(runs)), runs  # never overlapping
        assert runs[0][0] == f.start_s * 1000 and (f.start_s + 10) * 1000 in {s for s, _ in runs}
    restarted = json.loads((tmp_path / "checkpoint.json").read_text())
    # the old window 10 ended at +20: sampling resumed at the first new window boundary from there
    assert restarted["resume_s"] == -(-(f.start_s + 20) // window_s) * window_s


def test_cadence_changed_back_before_a_sample_under_the_new_one_still_never_overlaps(tmp_path: Path) -> None:
    """10 s windows, then 30 s stopped before any sample, then 10 s again: the second change must
    still know what the first one accounted for (window 10 was closed), not start over from 0."""
    f = fleet()
    host = f.hosts()[0]
    meter, spool = spooled_agent(tmp_path, f)
    for t in range(f.start_s, f.start_s + 14):
        meter.sample(t)
    meter.stop()
    for window_s in (30, 10):
        again = Agent(f.host_source(host.host_id), host, spool, window_s=window_s, interval_s=1, checkpoint=spool)
        again.stop()
    again = Agent(f.host_source(host.host_id), host, spool, window_s=10, interval_s=1, checkpoint=spool)
    for t in range(f.start_s + 14, f.start_s + 60):
        again.sample(t)
    keys = [(g["gpu_uuid"], g["window_start"]) for g in all_windows(spool, "gpu_windows")]
    assert len(keys) == len(set(keys))  # no GPU window twice
    ids = [w["record_id"] for w in all_windows(spool)]
    assert len(ids) == len(set(ids))  # and no usage window sent twice with other contents
