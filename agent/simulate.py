"""A simulated GPU fleet whose ground truth is known exactly.

Deterministic from a seed: providers own hosts, hosts hold GPUs of several
classes, and firms run jobs on GPUs. Every job starts and ends on a multiple of
``quantum_s``, so an agent sampling every ``quantum_s`` (or a divisor of it)
integrates allocated time exactly, and ``ground_truth()`` - computed from the job
intervals directly, not through the agent's code - is what billing must see.
"""

from __future__ import annotations

import bisect
import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from agent.devices import DeviceInfo, Observation
from agent.windows import HostIdentity

# (gpu_class, board power at 100% utilisation in watts, idle watts)
GPU_CLASSES: tuple[tuple[str, int, int], ...] = (
    ("H100-80G", 700, 70),
    ("A800-80G", 400, 50),
    ("Ascend-910B", 400, 60),
    ("L40S-48G", 350, 35),
)
DAY_S = 86_400


@dataclass(frozen=True, slots=True)
class SimGpu:
    provider_id: str
    host_id: str
    gpu_uuid: str
    gpu_class: str
    watts_busy: int
    watts_idle: int


@dataclass(frozen=True, slots=True)
class Job:
    gpu_uuid: str
    firm_id: str
    start_s: int  # epoch seconds, inclusive
    end_s: int  # epoch seconds, exclusive
    util_percent: int


TruthKey = tuple[str, date, str, str]  # (firm_id, day, provider_id, gpu_class)


class SimulatedFleet:
    def __init__(
        self,
        seed: int,
        start: datetime,
        days: int,
        providers: int = 3,
        hosts_per_provider: int = 2,
        gpus_per_host: int = 4,
        firms: int = 6,
        quantum_s: int = 60,
        busy_fraction: float = 0.6,
        mean_job_s: int = 3 * 3600,
    ) -> None:
        if start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        rng = random.Random(seed)
        self.start_s = int(start.timestamp())
        self.end_s = self.start_s + days * DAY_S
        self.quantum_s = quantum_s
        self.mean_job_s = mean_job_s
        self.firm_ids = [f"F{n:04d}" for n in range(1, firms + 1)]
        self.gpus: list[SimGpu] = []
        for p in range(1, providers + 1):
            for h in range(1, hosts_per_provider + 1):
                cls, busy_w, idle_w = GPU_CLASSES[rng.randrange(len(GPU_CLASSES))]
                for _ in range(gpus_per_host):
                    uuid = f"GPU-{rng.getrandbits(128):032x}"
                    self.gpus.append(SimGpu(f"P{p:02d}", f"P{p:02d}-H{h:02d}", uuid, cls, busy_w, idle_w))
        self.jobs: dict[str, list[Job]] = {}
        for gpu in self.gpus:
            self.jobs[gpu.gpu_uuid] = list(self._make_jobs(rng, gpu, busy_fraction))
        self._starts = {u: [j.start_s for j in js] for u, js in self.jobs.items()}

    def _make_jobs(self, rng: random.Random, gpu: SimGpu, busy_fraction: float) -> Iterator[Job]:
        q = self.quantum_s
        mean_job = self.mean_job_s
        t = self.start_s + rng.randrange(0, max(1, 4 * mean_job // 3 // q)) * q
        mean_gap = int(mean_job * (1 - busy_fraction) / busy_fraction)
        while t < self.end_s:
            length = max(q, int(rng.expovariate(1 / mean_job)) // q * q)
            end = min(t + length, self.end_s)
            yield Job(gpu.gpu_uuid, rng.choice(self.firm_ids), t, end, rng.randrange(20, 101))
            t = end + max(q, int(rng.expovariate(1 / max(mean_gap, q))) // q * q)

    # --- the device seam -------------------------------------------------
    def hosts(self) -> list[HostIdentity]:
        seen = dict.fromkeys(HostIdentity(g.provider_id, g.host_id) for g in self.gpus)
        return list(seen)

    def host_source(self, host_id: str) -> SimulatedHost:
        return SimulatedHost(self, [g for g in self.gpus if g.host_id == host_id])

    def job_at(self, gpu_uuid: str, now_s: int) -> Job | None:
        i = bisect.bisect_right(self._starts[gpu_uuid], now_s) - 1
        if i >= 0:
            job = self.jobs[gpu_uuid][i]
            if job.start_s <= now_s < job.end_s:
                return job
        return None

    # --- the ground truth ------------------------------------------------
    def ground_truth(self, tz: str = "UTC") -> dict[TruthKey, int]:
        """Allocated seconds per (firm, day, provider, class), from job intervals alone."""
        zone = ZoneInfo(tz)
        by_uuid = {g.gpu_uuid: g for g in self.gpus}
        out: dict[TruthKey, int] = defaultdict(int)
        for uuid, jobs in self.jobs.items():
            gpu = by_uuid[uuid]
            for job in jobs:
                t = job.start_s
                while t < job.end_s:
                    local = datetime.fromtimestamp(t, UTC).astimezone(zone)
                    next_midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), zone)
                    upto = min(job.end_s, int(next_midnight.timestamp()))
                    out[(job.firm_id, local.date(), gpu.provider_id, gpu.gpu_class)] += upto - t
                    t = upto
        return dict(out)


class SimulatedHost:
    """One host's GPUs of a simulated fleet, as a ``DeviceSource``."""

    def __init__(self, fleet: SimulatedFleet, gpus: list[SimGpu]) -> None:
        self.fleet = fleet
        self.gpus = gpus
        self.identity = HostIdentity(gpus[0].provider_id, gpus[0].host_id)
        self._energy_mj = {g.gpu_uuid: 0 for g in gpus}
        self._util = {g.gpu_uuid: 0 for g in gpus}  # each GPU's utilisation since the previous sample
        self._last_s: int | None = None

    def devices(self) -> list[DeviceInfo]:
        return [DeviceInfo(g.gpu_uuid, g.gpu_class) for g in self.gpus]

    def observe(self, now_s: int) -> list[Observation]:
        elapsed_s = 0 if self._last_s is None else now_s - self._last_s
        self._last_s = now_s
        out = []
        for g in self.gpus:
            # since the previous sample the GPU ran at that sample's job's utilisation: the counter grew
            # at its power (watts * s * 1000 mJ), and the driver reports that utilisation now
            before = self._util[g.gpu_uuid]
            watts = g.watts_idle + (g.watts_busy - g.watts_idle) * before // 100
            energy = self._energy_mj[g.gpu_uuid] + watts * elapsed_s * 1000
            self._energy_mj[g.gpu_uuid] = energy
            job = self.fleet.job_at(g.gpu_uuid, now_s)
            self._util[g.gpu_uuid] = job.util_percent if job else 0
            measured = float(before) if elapsed_s else 0.0
            out.append(Observation(g.gpu_uuid, job.firm_id if job else None, measured, energy))
        return out
