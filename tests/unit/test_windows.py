"""Window integration, exact against ground truth computed from intervals."""

from __future__ import annotations

from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.devices import DeviceInfo, Observation
from agent.windows import HostIdentity, WindowAccumulator

HOST = HostIdentity("P01", "h1")


def run(timeline: dict[str, list[str | None]], interval_s: int, window_s: int, t0: int = 0) -> list[dict]:  # type: ignore[type-arg]
    """timeline[gpu] = holder per sampling step; returns every closed window."""
    gpus = sorted(timeline)
    acc = WindowAccumulator(HOST, [DeviceInfo(g, "H100-80G") for g in gpus], window_s, interval_s)
    steps = len(next(iter(timeline.values())))
    out = []
    for i in range(steps):
        now = t0 + i * interval_s
        obs = [Observation(g, timeline[g][i], 50.0, 1000 * now) for g in gpus]
        out += acc.add(now, obs)
    return out + acc.flush()


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
    windows = run(timeline, interval_s, window_s, t0)
    truth: dict[tuple[str, str, int], int] = defaultdict(int)
    for gpu, seq in timeline.items():
        for i, firm in enumerate(seq):
            if firm is not None:
                t = t0 + i * interval_s
                truth[(gpu, firm, t - t % window_s)] += interval_s
    got = {(w["gpu_uuid"], w["firm_id"], w["window_start"] // 1000): w["allocated_seconds"] for w in windows}
    assert got == dict(truth)
    # one record per (gpu, firm, window), ids unique, seq contiguous from 0
    assert len({w["record_id"] for w in windows}) == len(windows)
    assert sorted(w["seq"] for w in windows) == list(range(len(windows)))
    for w in windows:
        assert w["window_start"] % (window_s * 1000) == 0
        assert w["window_end"] - w["window_start"] == window_s * 1000
        assert 0 < w["allocated_seconds"] <= window_s


def test_firm_switch_mid_window_gives_two_records() -> None:
    windows = run({"GPU-a": ["F1"] * 3 + ["F2"] * 3}, interval_s=10, window_s=60)
    assert [(w["firm_id"], w["allocated_seconds"]) for w in windows] == [("F1", 30), ("F2", 30)]


def test_busy_and_energy_are_integrated_per_holder() -> None:
    acc = WindowAccumulator(HOST, [DeviceInfo("GPU-a", "H100-80G")], 60, 30)
    closed = acc.add(0, [Observation("GPU-a", "F1", 100.0, 0)])
    closed += acc.add(30, [Observation("GPU-a", "F1", 50.0, 9_000_000)])
    closed += acc.add(60, [Observation("GPU-a", None, 0.0, 15_000_000)])
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
    closed = acc.add(0, [Observation("GPU-a", "F1", None, 5_000)])
    closed += acc.add(30, [Observation("GPU-a", "F1", 10.0, 100)])  # counter went back: driver reload
    closed += acc.add(60, [Observation("GPU-a", None, 0.0, 200)])
    (w,) = closed
    assert w["allocated_seconds"] == 60
    assert w["busy_seconds"] is None
    assert w["energy_joules"] is None
