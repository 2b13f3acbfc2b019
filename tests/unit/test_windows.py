"""Window integration, exact against ground truth computed from intervals."""

from __future__ import annotations

import json
from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.devices import DeviceInfo, Observation
from agent.windows import HostIdentity, WindowAccumulator

HOST = HostIdentity("P01", "h1")


def run(timeline: dict[str, list[str | None]], interval_s: int, window_s: int, t0: int = 0,
        gpu_out: list[dict] | None = None) -> list[dict]:  # type: ignore[type-arg]  # fmt: skip
    """timeline[gpu] = holder per sampling step; returns every closed window (its GPU windows
    into ``gpu_out``)."""
    gpus = sorted(timeline)
    acc = WindowAccumulator(HOST, [DeviceInfo(g, "H100-80G") for g in gpus], window_s, interval_s)
    steps = len(next(iter(timeline.values())))
    out = []
    for i in range(steps):
        now = t0 + i * interval_s
        obs = [Observation(g, timeline[g][i], 50.0, 1000 * now) for g in gpus]
        out += acc.add(now, obs)
    out += acc.flush()
    if gpu_out is not None:
        gpu_out += acc.take_gpu_windows()
    return out


holders = st.sampled_from([None, "F1", "F2", "F3"])


@settings(max_examples=200)
@given(
    st.integers(1, 3).flatmap(
        lambda n: st.integers(1, 40).flatmap(
            lambda steps: st.dictionaries(
                st.sampled_from(["GPU-a", "GPU-b", "GPU-c"]),
                st.lists(holders, min_size=steps, max_size=steps),
                min_size=n,
                max_size=n,
            )
        )
    ),
    st.sampled_from([(1, 60), (10, 60), (20, 60), (5, 5)]),
    st.integers(0, 10_000),
)
def test_allocated_seconds_equal_interval_truth(timeline, cadence, t0_steps) -> None:  # type: ignore[no-untyped-def]
    interval_s, window_s = cadence
    t0 = t0_steps * interval_s
    gpu_windows: list[dict] = []  # type: ignore[type-arg]
    windows = run(timeline, interval_s, window_s, t0, gpu_windows)
    truth: dict[tuple[str, str, int], int] = defaultdict(int)
    for gpu, seq in timeline.items():
        for i, firm in enumerate(seq):
            if firm is not None:
                t = t0 + i * interval_s
                truth[(gpu, firm, t - t % window_s)] += interval_s
    got = {(w["gpu_uuid"], w["firm_id"], w["window_start"] // 1000): w["allocated_seconds"] for w in windows}
    assert got == dict(truth)
    # one record per (gpu, firm, window), ids unique, seq contiguous from 0 over windows and GPU windows
    assert len({w["record_id"] for w in windows}) == len(windows)
    assert sorted(w["seq"] for w in windows + gpu_windows) == list(range(len(windows) + len(gpu_windows)))
    # one GPU window per GPU and window sampled, every second in it once: held, idle or (before the
    # first sample, after the last) unsampled
    sampled: dict[tuple[str, int], list[str | None]] = defaultdict(list)
    for gpu, seq in timeline.items():
        for i, firm in enumerate(seq):
            t = t0 + i * interval_s
            sampled[(gpu, t - t % window_s)].append(firm)
    by_key = {(g["gpu_uuid"], g["window_start"] // 1000): g for g in gpu_windows}
    assert len(by_key) == len(gpu_windows) and set(by_key) == set(sampled)
    for key, g in by_key.items():
        held = sum(truth.get((key[0], f, key[1]), 0) for f in ("F1", "F2", "F3"))
        idle = sampled[key].count(None) * interval_s
        assert (g["allocated_seconds"], g["unattributed_seconds"], g["idle_seconds"]) == (held, 0, idle)
        assert (g["unread_seconds"], g["unsampled_seconds"]) == (0, window_s - len(sampled[key]) * interval_s)
        assert g["usage_windows"] == sum(1 for k in truth if (k[0], k[2]) == key)
    for w in windows:
        assert w["window_start"] % (window_s * 1000) == 0
        assert w["window_end"] - w["window_start"] == window_s * 1000
        assert 0 < w["allocated_seconds"] <= window_s


def test_firm_switch_mid_window_gives_two_records() -> None:
    windows = run({"GPU-a": ["F1"] * 3 + ["F2"] * 3}, interval_s=10, window_s=60)
    assert [(w["firm_id"], w["allocated_seconds"]) for w in windows] == [("F1", 30), ("F2", 30)]


def test_busy_and_energy_are_integrated_per_holder() -> None:
    """A sample's utilisation is of the interval before it (as NVML measures): 100 % over [0, 30),
    50 % over [30, 60), both F1's; the reading at 60 closes the window after crediting it."""
    acc = WindowAccumulator(HOST, [DeviceInfo("GPU-a", "H100-80G")], 60, 30)
    closed = acc.add(0, [Observation("GPU-a", "F1", 0.0, 0)])
    closed += acc.add(30, [Observation("GPU-a", "F1", 100.0, 9_000_000)])
    closed += acc.add(60, [Observation("GPU-a", None, 50.0, 15_000_000)])
    closed += acc.flush()
    assert len(closed) == 1
    w = closed[0]
    assert (w["allocated_seconds"], w["busy_seconds"], w["energy_joules"]) == (60, 45.0, 15_000.0)
    assert (w["samples_taken"], w["samples_missed"]) == (2, 0)


def test_missed_samples_are_counted_per_gpu_window_and_not_billed() -> None:
    acc = WindowAccumulator(HOST, [DeviceInfo("GPU-a", "H100-80G")], 60, 20)
    closed = acc.add(0, [Observation("GPU-a", "F1", 50.0, 0)])
    closed += acc.add(20, [Observation("GPU-a", None, None, None, missed=True)])
    closed += acc.add(40, [Observation("GPU-a", "F1", 50.0, 0)])
    closed += acc.add(60, [Observation("GPU-a", "F2", 50.0, 0)])  # next window: its own counts
    closed += acc.flush()
    assert [(w["firm_id"], w["allocated_seconds"], w["samples_taken"], w["samples_missed"]) for w in closed] == [
        ("F1", 40, 2, 1),
        ("F2", 20, 1, 0),
    ]


def test_energy_counter_reset_and_unsupported_metrics_are_never_numbers() -> None:
    acc = WindowAccumulator(HOST, [DeviceInfo("GPU-a", "H100-80G")], 60, 30)
    closed = acc.add(0, [Observation("GPU-a", "F1", 10.0, 5_000)])
    closed += acc.add(30, [Observation("GPU-a", "F1", None, 100)])  # counter went back: driver reload
    closed += acc.add(60, [Observation("GPU-a", None, 0.0, 200)])
    (w,) = closed
    assert w["allocated_seconds"] == 60
    assert w["busy_seconds"] is None
    assert w["energy_joules"] is None


def busy_run(holders: list[str | None], util: list[float], window_s: int, interval_s: int = 1,
             closed_by: int | None = None) -> list[tuple[str, int, int, float | None]]:  # fmt: skip
    """Sample ``holders[i]`` at ``i * interval_s``; ``util[i]`` is the truth over ``[i, i + 1)``,
    reported (as the driver does) by the sample after it. (firm, start s, allocated, busy) per window."""
    acc = WindowAccumulator(HOST, [DeviceInfo("GPU-a", "H100-80G")], window_s, interval_s)
    closed = []
    n = len(holders) if closed_by is None else closed_by
    for i in range(n + 1):
        measured = util[i - 1] if i else 0.0
        firm = holders[i] if i < len(holders) else None
        closed += acc.add(i * interval_s, [Observation("GPU-a", firm, measured, None)])
    closed += acc.flush()
    return [(w["firm_id"], w["window_start"] // 1000, w["allocated_seconds"], w["busy_seconds"]) for w in closed]


def test_busy_seconds_belong_to_the_interval_they_measure_and_its_holder() -> None:
    """F1 holds [0, 3) at 100 %, F2 [3, 6) at 50 %: the handover gives F1 nothing of F2's and the
    reverse; no second is shifted into the next holder or the next window."""
    got = busy_run(["F1"] * 3 + ["F2"] * 3, [100.0] * 3 + [50.0] * 3, window_s=60)
    assert got == [("F1", 0, 3, 3.0), ("F2", 0, 3, 1.5)]


def test_a_window_counts_its_own_seconds_not_the_one_before_it() -> None:
    """Windows of 4 s, one job at 100 % for [2, 6) then 25 % for [6, 10): window [0, 4) has 2 busy
    seconds, [4, 8) has 2 x 100 % + 2 x 25 %, [8, 12) has 2 x 25 %."""
    holders = [None, None] + ["F1"] * 8
    util = [0.0, 0.0, 100.0, 100.0, 100.0, 100.0, 25.0, 25.0, 25.0, 25.0]
    assert busy_run(holders, util, window_s=4) == [("F1", 0, 2, 2.0), ("F1", 4, 4, 2.5), ("F1", 8, 2, 0.5)]


def test_busy_is_unknown_when_its_interval_was_not_measured() -> None:
    """Shut down (``flush``) before the last interval was read: that window's busy is None, never
    the part that was measured; a missed reading makes its interval unknown too."""
    assert busy_run(["F1"] * 3, [100.0] * 3, window_s=60, closed_by=2) == [("F1", 0, 3, None)]
    acc = WindowAccumulator(HOST, [DeviceInfo("GPU-a", "H100-80G")], 60, 1)
    closed = acc.add(0, [Observation("GPU-a", "F1", 0.0, None)])
    closed += acc.add(1, [Observation("GPU-a", None, None, None, missed=True)])  # [0, 1) not measured
    closed += acc.add(2, [Observation("GPU-a", None, 0.0, None)])
    closed += acc.flush()
    assert [(w["allocated_seconds"], w["busy_seconds"]) for w in closed] == [(1, None)]


def test_utilisation_measured_for_another_firm_is_never_credited() -> None:
    """The source says whose use its figure is (the holder it saw at the interval's start). Where
    that is not the integrator's holder - a sample the integrator refused (clock stepped back) in
    between, or a restart with no gap, whose first interval the new source never saw begin - the
    interval's use is unknown, never credited to the other firm."""
    acc = WindowAccumulator(HOST, [DeviceInfo("GPU-a", "H100-80G")], 60, 1)
    acc.add(10, [Observation("GPU-a", "F2", 0.0, None, util_for="")])
    acc.add(10, [Observation("GPU-a", "F1", 0.0, None, util_for="F2")])  # refused: 10 is counted already
    acc.add(11, [Observation("GPU-a", "F1", 80.0, None, util_for="F1")])  # the source thinks F1 held [10, 11)
    acc.add(12, [Observation("GPU-a", "F1", 80.0, None, util_for="F1")])
    got = {w["firm_id"]: w["busy_seconds"] for w in acc.flush()}
    assert acc.samples_rejected == 1 and got == {"F2": None, "F1": None}  # F1's [11, 12) read; [12, 13) not
    acc = WindowAccumulator(HOST, [DeviceInfo("GPU-a", "H100-80G")], 60, 1)
    acc.add(10, [Observation("GPU-a", "F1", 0.0, None)])
    restarted = WindowAccumulator.restore(HOST, json.loads(json.dumps(acc.snapshot())))
    restarted.add(11, [Observation("GPU-a", "F1", 90.0, None, util_for="")])  # a new source: start unseen
    restarted.add(12, [Observation("GPU-a", "F1", 20.0, None, util_for="F1")])
    assert [w["busy_seconds"] for w in restarted.flush()] == [None]


def test_a_checkpoint_keeps_whether_the_last_interval_was_measured() -> None:
    acc = WindowAccumulator(HOST, [DeviceInfo("GPU-a", "H100-80G")], 60, 1)
    acc.add(0, [Observation("GPU-a", "F1", 0.0, None)])
    acc.add(1, [Observation("GPU-a", "F1", 100.0, None)])
    again = WindowAccumulator.restore(HOST, json.loads(json.dumps(acc.snapshot())))
    again.add(2, [Observation("GPU-a", None, 100.0, None)])  # reads [1, 2): F1's
    assert [(w["allocated_seconds"], w["busy_seconds"]) for w in again.flush()] == [(2, 2.0)]
    unread = WindowAccumulator.restore(HOST, json.loads(json.dumps(acc.snapshot())))
    assert [(w["allocated_seconds"], w["busy_seconds"]) for w in unread.flush()] == [(2, None)]


def test_a_window_open_across_the_upgrade_from_0_1_0_has_no_busy_figure() -> None:
    """0.1.0 checkpoints (no ``measured``) counted busy seconds one interval late: mixing the two
    would count one interval twice."""
    acc = WindowAccumulator(HOST, [DeviceInfo("GPU-a", "H100-80G")], 60, 1)
    acc.add(0, [Observation("GPU-a", "F1", 100.0, None)])
    snap = json.loads(json.dumps(acc.snapshot()))
    del snap["gpus"]["GPU-a"]["unmeasured"]
    assert all(len(v) == 3 for v in snap["gpus"]["GPU-a"]["firms"].values())  # 0.1.0 reads these lists
    old = WindowAccumulator.restore(HOST, snap)
    old.add(1, [Observation("GPU-a", None, 100.0, None)])
    assert [(w["allocated_seconds"], w["busy_seconds"]) for w in old.flush()] == [(1, None)]


def test_instants_the_loop_skipped_are_missed_samples_in_the_windows_they_fall_in() -> None:
    """Sampled at 0..5 and 8..9 (6 and 7 skipped: a busy host), 10 s windows: 8 allocated seconds,
    2 missed, not an 8-second job. Down from 9 to 23: the rest of [0, 10) and 20..22 are missed;
    [10, 20) lies wholly inside the gap and has no record to say so."""
    acc = WindowAccumulator(HOST, [DeviceInfo("GPU-a", "H100-80G")], 10, 1)
    closed = []
    for t in [*range(6), 8, 9, 23, 24]:
        closed += acc.add(t, [Observation("GPU-a", "F1", 100.0, None)])
    closed += acc.flush()
    got = [(w["window_start"] // 1000, w["allocated_seconds"], w["samples_missed"], w["busy_seconds"]) for w in closed]
    assert got == [(0, 8, 2, None), (20, 2, 3, None)]
    for w in closed:  # every instant of a window is taken or missed, once
        assert w["samples_taken"] + w["samples_missed"] <= 10


def test_a_late_tick_is_sampled_at_once_and_a_skipped_one_is_reported() -> None:
    """The sample at 2 takes 1.5 s (tick 3 is late: sampled at once, as 3); the one at 5 takes 2.2 s
    (tick 6 and 7 have passed: 7 is sampled, 6 is a missed sample)."""
    from agent.runner import run_realtime

    clock = [0.2]
    slow = {2: 1.5, 5: 2.2}
    ticks: list[int] = []

    class Probe:
        def sample(self, t: int) -> None:
            ticks.append(t)
            clock[0] = t + slow.get(t, 0.01)

        def stop(self) -> None:
            pass

    def sleep(s: float) -> None:
        clock[0] += s

    run_realtime(Probe(), 1, None, should_stop=lambda: len(ticks) >= 7, clock=lambda: clock[0], sleep=sleep)  # type: ignore[arg-type]
    assert ticks == [1, 2, 3, 4, 5, 7, 8]


def test_a_sleep_that_ends_late_samples_the_latest_due_tick_not_a_stale_one() -> None:
    """The process is stopped for 2.5 s while it sleeps towards tick 4: it wakes at 6.5 and samples
    6 (what it sees now, as now); 4 and 5 are a gap, never the state at 6.5 passed off as 4."""
    from agent.runner import run_realtime

    clock = [0.2]
    ticks: list[int] = []

    class Probe:
        def sample(self, t: int) -> None:
            ticks.append(t)
            clock[0] = t + 0.01

        def stop(self) -> None:
            pass

    def sleep(s: float) -> None:
        clock[0] += s + (2.5 if ticks[-1:] == [3] else 0)

    run_realtime(Probe(), 1, None, should_stop=lambda: len(ticks) >= 6, clock=lambda: clock[0], sleep=sleep)  # type: ignore[arg-type]
    assert ticks == [1, 2, 3, 6, 7, 8]


def test_a_clock_stepped_back_does_not_make_the_loop_sleep_out_the_step() -> None:
    """The clock reads an hour early for a moment after the sample at 3: the loop goes on from the
    clock (the instants it already counted are refused by the accumulator), not an hour later."""
    from agent.runner import run_realtime

    clock = [10_000.2]
    ticks: list[int] = []

    class Probe:
        def sample(self, t: int) -> None:
            ticks.append(t)
            clock[0] = t + 0.01 - (3600 if t == 10_003 else 0)

        def stop(self) -> None:
            pass

    def sleep(s: float) -> None:
        assert s <= 1.0, f"slept {s} s"
        clock[0] += s
        if clock[0] < 10_000:
            clock[0] += 3600  # corrected by the time server

    run_realtime(Probe(), 1, None, should_stop=lambda: len(ticks) >= 6, clock=lambda: clock[0], sleep=sleep)  # type: ignore[arg-type]
    assert ticks[:3] == [10_001, 10_002, 10_003] and max(ticks) < 10_010


def test_an_instant_off_the_interval_grid_is_refused_so_no_interval_counts_twice() -> None:
    acc = WindowAccumulator(HOST, [DeviceInfo("GPU-a", "H100-80G")], 60, 10)
    for t in (0, 10, 20, 30, 40, 50, 55):  # 55 would stand for [55, 65), overlapping 50's [50, 60)
        acc.add(t, [Observation("GPU-a", "F1", 50.0, 1000 * t)])
    assert acc.samples_rejected == 1
    windows = acc.flush()
    (g,) = acc.take_gpu_windows()
    assert [w["allocated_seconds"] for w in windows] == [60]
    assert (g["allocated_seconds"], g["unsampled_seconds"]) == (60, 0)
