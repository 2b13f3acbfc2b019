"""The simulated fleet: deterministic, and its ground truth adds up."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest

from agent.simulate import SimulatedFleet

START = datetime(2026, 3, 1, tzinfo=UTC)


def test_same_seed_same_fleet_other_seed_other_fleet() -> None:
    a, b, c = (SimulatedFleet(seed=s, start=START, days=2) for s in (1, 1, 2))
    assert a.jobs == b.jobs and a.gpus == b.gpus
    assert a.jobs != c.jobs


@pytest.mark.parametrize("tz", ["UTC", "Asia/Shanghai"])
def test_ground_truth_conserves_job_seconds_and_splits_days_in_the_billing_zone(tz: str) -> None:
    fleet = SimulatedFleet(seed=7, start=START, days=3, quantum_s=60)
    truth = fleet.ground_truth(tz)
    assert sum(truth.values()) == sum(j.end_s - j.start_s for js in fleet.jobs.values() for j in js)
    assert all(0 < v <= 86_400 * 4 for v in truth.values())  # per (firm, day, provider, class), 4 GPUs a host
    days = {k[1] for k in truth}
    if tz == "Asia/Shanghai":  # UTC midnight is 08:00 in Shanghai: the first UTC day spans two local days
        assert min(days).isoformat() == "2026-03-01"
        assert max(days).isoformat() == "2026-03-04"
    else:
        assert max(days).isoformat() == "2026-03-03"


def test_jobs_are_quantized_and_never_overlap() -> None:
    fleet = SimulatedFleet(seed=3, start=START, days=2, quantum_s=20)
    for jobs in fleet.jobs.values():
        for j in jobs:
            assert j.start_s % 20 == 0 and j.end_s % 20 == 0 and j.start_s < j.end_s
        for prev, nxt in itertools.pairwise(jobs):
            assert prev.end_s < nxt.start_s
