"""The spool and the checkpointed agent: durable before sent, crash at any step, bounded, in order."""

from __future__ import annotations

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
from gpumeter.record import decode_batch, verify

KEY = ("host-key-1", bytes(range(32)))
START = datetime(2026, 3, 1, tzinfo=UTC)


def fleet() -> SimulatedFleet:
    return SimulatedFleet(seed=4, start=START, days=1, providers=1, hosts_per_provider=1, gpus_per_host=3,
                          quantum_s=1, mean_job_s=20)  # fmt: skip


def spooled_agent(root: Path, f: SimulatedFleet, **spool_kw: Any) -> tuple[Agent, Spool]:
    spool = Spool(root, signing_key=KEY, **spool_kw)
    host = f.hosts()[0]
    return Agent(f.host_source(host.host_id), host, spool, window_s=10, interval_s=1, checkpoint=spool), spool


def all_windows(spool: Spool) -> list[dict[str, Any]]:
    out = []
    for e in spool.pending(10_000):
        value, headers, _ = spool.read(e)
        assert verify(value, headers, {KEY[0]: KEY[1]}) == KEY[0]
        out.extend(decode_batch(value)["windows"])
    return out


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
    assert sorted(w["seq"] for w in all_windows(spool)) == list(range(len(all_windows(spool))))


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
    assert [w["seq"] for w in windows] == list(range(len(windows)))


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
    seqs = [w["seq"] for v in kafka.delivered for w in decode_batch(v)["windows"]]
    assert sorted(seqs) == list(range(meter.windows_closed))


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
    assert [b["high_water_seq"] for b in batches] == [max(w["seq"] for w in b["windows"]) for b in batches]
    now[0] = 59.0
    assert sender.beat_once() == "idle" and len(kafka.delivered) == len(batches)  # sent something 59 s ago
    now[0] = 61.0
    assert sender.beat_once() == "sent" and sender.heartbeats_sent == 1
    beat = decode_batch(kafka.delivered[-1])
    assert beat["windows"] == [] and beat["high_water_seq"] == meter.windows_closed - 1 == spool.next_seq - 1
    assert made[-1][1] == kafka.delivered[-1] and verify(made[-1][1], made[-1][2], {KEY[0]: KEY[1]}) == KEY[0]
    assert sender.beat_once() == "idle"  # the next one is due a minute later
