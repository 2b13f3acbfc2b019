"""Window integration: samples in, closed usage windows out. Pure; no clock, no I/O.

Each sample taken at ``t`` stands for the half-open interval ``[t, t + interval)``:
the firm holding the GPU at ``t`` is credited ``interval`` allocated seconds. What
the driver measures over that interval - the utilisation (an ``Observation``'s
``util_percent`` is the mean over the interval *before* it) and the energy
counter's growth - is read at the next sample and credited then to the same
holder, in the window the interval belongs to (the next sample may open a new
window: the old one is credited before it closes). Windows are aligned to
wall-clock multiples of ``window_s``; one window record per (GPU, firm) that
held the GPU in it. Sampling times are whole seconds and ``window_s`` is a
multiple of ``interval_s``, so allocated seconds are exact when ownership
changes on sample boundaries.

Never twice, never guessed: an instant at or before a GPU's last sample is
rejected (clock stepped back, or a restart in the same second); energy across a
gap longer than one interval (the agent was down) or across a missed sample is
unknown, so that window's ``energy_joules`` is ``None``; so are its
``busy_seconds`` when the interval's utilisation is not known (a gap, a missed
or unsupported reading, or a window closed before its last interval was
measured: ``flush`` at shutdown). ``snapshot()`` and
``restore()`` carry open windows across an agent restart, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.devices import DeviceInfo, Observation
from gpumeter.record import UsageWindow, record_id


@dataclass(slots=True)
class _FirmTotals:
    allocated_seconds: int = 0
    busy_seconds: float | None = 0.0
    energy_joules: float | None = 0.0
    measured: bool = True  # False while this firm's latest interval waits for the next sample's reading


@dataclass(slots=True)
class _GpuState:
    info: DeviceInfo
    window_start_s: int | None = None
    firms: dict[str, _FirmTotals] = field(default_factory=dict)
    last_holder: str | None = None
    last_energy_mj: int | None = None
    last_sample_s: int | None = None
    window_missed: int = 0  # instants of this GPU in the open window NVML could not answer or the loop skipped


@dataclass(frozen=True, slots=True)
class HostIdentity:
    provider_id: str
    host_id: str


class WindowAccumulator:
    def __init__(self, host: HostIdentity, devices: list[DeviceInfo], window_s: int, interval_s: int) -> None:
        if window_s <= 0 or interval_s <= 0 or window_s % interval_s:
            raise ValueError(f"window_s ({window_s}) must be a positive multiple of interval_s ({interval_s})")
        self.host = host
        self.window_s = window_s
        self.interval_s = interval_s
        self._gpus = {d.gpu_uuid: _GpuState(d) for d in devices}
        self.next_seq = 0
        self.samples_missed = 0
        self.samples_rejected = 0

    def add_device(self, info: DeviceInfo) -> None:
        """Meter a device that appeared after start (idempotent)."""
        self._gpus.setdefault(info.gpu_uuid, _GpuState(info))

    def gpus(self) -> list[str]:
        """Every GPU metered: those of the source and those restored from a checkpoint."""
        return list(self._gpus)

    def knows(self, gpu_uuid: str) -> bool:
        return gpu_uuid in self._gpus

    def add(self, now_s: int, observations: list[Observation]) -> list[UsageWindow]:
        """Feed one sampling instant; return the windows this instant closed."""
        closed: list[UsageWindow] = []
        window_start = now_s - now_s % self.window_s
        for obs in observations:
            st = self._gpus[obs.gpu_uuid]
            if st.last_sample_s is not None and now_s <= st.last_sample_s:
                self.samples_rejected += 1  # this instant (or a later one) is already counted
                continue
            gap = st.last_sample_s is not None and now_s - st.last_sample_s > self.interval_s
            missed_old, missed_new = self._not_sampled(st, window_start, now_s) if gap else (0, 0)
            st.window_missed += missed_old
            st.last_sample_s = now_s
            # energy grown and utilisation measured since the previous sample belong to whoever held
            # the GPU then, in that sample's window (still open: it is closed below)
            if st.last_holder is not None:
                totals = st.firms[st.last_holder]
                now_mj, last_mj = obs.energy_mj_total, st.last_energy_mj
                # unavailable, a gap, or the counter went back (driver reload): no energy figure
                if gap or now_mj is None or last_mj is None or now_mj < last_mj:
                    totals.energy_joules = None
                elif totals.energy_joules is not None:
                    totals.energy_joules += (now_mj - last_mj) / 1000.0
                if gap or obs.util_percent is None or totals.busy_seconds is None:
                    totals.busy_seconds = None  # the interval's use is not known: never a guess
                else:
                    totals.busy_seconds += obs.util_percent * self.interval_s / 100.0
                totals.measured = True
            if st.window_start_s is not None and st.window_start_s != window_start:
                closed.extend(self._close(st))
            st.window_start_s = window_start
            st.window_missed += missed_new
            st.last_energy_mj = obs.energy_mj_total
            st.last_holder = obs.firm_id
            if obs.missed:
                self.samples_missed += 1
                st.window_missed += 1
            if obs.firm_id is None:
                continue
            totals = st.firms.setdefault(obs.firm_id, _FirmTotals())
            totals.allocated_seconds += self.interval_s
            totals.measured = False  # this interval's use is read at the next sample
        return closed

    def _not_sampled(self, st: _GpuState, window_start: int, now_s: int) -> tuple[int, int]:
        """Sampling instants skipped between the GPU's last sample and ``now_s`` (a tick the loop
        missed, the agent down): (those in its open window, those in ``now_s``'s window). They are
        ``samples_missed``: nobody is billed for them and the record says so. Windows wholly inside
        the gap have no record to say it in."""
        if st.last_sample_s is None:
            return 0, 0
        first = st.last_sample_s + self.interval_s
        if st.window_start_s is None:
            old = 0
        else:
            old = max(0, min(now_s, st.window_start_s + self.window_s) - first) // self.interval_s
        if st.window_start_s == window_start:
            return old, 0
        return old, max(0, now_s - max(first, window_start)) // self.interval_s

    def flush(self) -> list[UsageWindow]:
        """Close every open window (agent shutdown)."""
        out: list[UsageWindow] = []
        for st in self._gpus.values():
            out.extend(self._close(st))
            st.window_start_s = None
            st.last_holder = None
        return out

    def snapshot(self) -> dict[str, Any]:
        """Open windows and counters as plain JSON-able data (floats round-trip exactly)."""
        return {
            "window_s": self.window_s,
            "interval_s": self.interval_s,
            "next_seq": self.next_seq,
            "gpus": {
                uuid: {
                    "gpu_class": st.info.gpu_class,
                    "window_start_s": st.window_start_s,
                    "last_holder": st.last_holder,
                    "last_energy_mj": st.last_energy_mj,
                    "last_sample_s": st.last_sample_s,
                    "window_missed": st.window_missed,
                    "firms": {f: [t.allocated_seconds, t.busy_seconds, t.energy_joules] for f, t in st.firms.items()},
                    # a key of its own, so an agent rolled back to 0.1.0 still reads the firms' lists
                    "unmeasured": sorted(f for f, t in st.firms.items() if not t.measured),
                }
                for uuid, st in self._gpus.items()
            },
        }

    @classmethod
    def restore(cls, host: HostIdentity, snap: dict[str, Any]) -> WindowAccumulator:
        acc = cls(host, [], int(snap["window_s"]), int(snap["interval_s"]))
        acc.next_seq = int(snap["next_seq"])
        for uuid, g in snap["gpus"].items():
            st = _GpuState(DeviceInfo(uuid, g["gpu_class"]), g["window_start_s"])
            st.last_holder, st.last_energy_mj = g["last_holder"], g["last_energy_mj"]
            st.last_sample_s = g["last_sample_s"]
            st.window_missed = int(g.get("window_missed", 0))  # absent in checkpoints of 0.1.0
            # a checkpoint of 0.1.0 has no ``unmeasured``: it counted busy seconds the other way (one
            # interval late), so a window open across the upgrade has none
            unmeasured = g.get("unmeasured")
            st.firms = {
                f: _FirmTotals(int(a), b if unmeasured is not None else None, e, f not in (unmeasured or ()))
                for f, (a, b, e) in g["firms"].items()
            }
            acc._gpus[uuid] = st
        return acc

    def drop_open_before(self, end_s: int) -> int:
        """Forget open windows that end at or before ``end_s`` (already closed and spooled); count them."""
        dropped = 0
        for st in self._gpus.values():
            if st.window_start_s is not None and st.window_start_s + self.window_s <= end_s:
                dropped += len(st.firms)
                st.firms, st.window_start_s, st.last_holder, st.window_missed = {}, None, None, 0
        return dropped

    def _close(self, st: _GpuState) -> list[UsageWindow]:
        if st.window_start_s is None:
            return []
        start_ms = st.window_start_s * 1000
        out: list[UsageWindow] = []
        for firm_id in sorted(st.firms):
            t = st.firms[firm_id]
            out.append(
                {
                    "record_id": record_id(self.host.host_id, st.info.gpu_uuid, firm_id, start_ms),
                    "seq": self.next_seq,
                    "provider_id": self.host.provider_id,
                    "host_id": self.host.host_id,
                    "gpu_uuid": st.info.gpu_uuid,
                    "gpu_class": st.info.gpu_class,
                    "firm_id": firm_id,
                    "window_start": start_ms,
                    "window_end": start_ms + self.window_s * 1000,
                    "allocated_seconds": t.allocated_seconds,
                    "busy_seconds": None if t.busy_seconds is None or not t.measured else round(t.busy_seconds, 3),
                    "energy_joules": None if t.energy_joules is None else round(t.energy_joules, 3),
                    "samples_taken": t.allocated_seconds // self.interval_s,
                    "samples_missed": st.window_missed,
                    "signature": None,
                }
            )
            self.next_seq += 1
        st.firms = {}
        st.window_missed = 0
        return out
