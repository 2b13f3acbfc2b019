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

Every second accounted once: each GPU window the agent knows of also closes as
a ``GpuWindow`` (gpumeter/CONTRACT.md) whose seconds are allocated (the firm
windows), unattributed, idle (sampled, no process), unread (sampled, the device
did not answer) or unsampled (not sampled at all: the remainder, since every
sampled instant is counted once). A gap that spans whole windows (the agent was
down) closes them as wholly unsampled GPU windows, at most ``MAX_GAP_WINDOWS``
per GPU; the pipeline reports older ones as missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.devices import DeviceInfo, Observation
from gpumeter.record import UNATTRIBUTED, GpuWindow, UsageWindow, record_id

# whole windows of a gap (the agent down) closed as unsampled GPU windows, per GPU: a day of 60 s windows
MAX_GAP_WINDOWS = 1440


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
    window_idle: int = 0  # instants sampled in the open window with no process on the GPU
    window_unread: int = 0  # instants sampled in the open window that the device could not answer


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
        self.samples_missed = 0  # GPU samples the device could not answer
        self.samples_skipped = 0  # GPU sampling instants not sampled (a skipped tick, the agent down)
        self.samples_rejected = 0
        self._gpu_windows: list[GpuWindow] = []  # closed, not yet taken (``take_gpu_windows``)
        self.resume_s = 0  # instants before this are refused: accounted under another cadence (``resume_at``)
        self.accounted_s = 0  # the end of what an earlier cadence accounted for (``resume_at``'s argument)

    def add_device(self, info: DeviceInfo) -> None:
        """Meter a device that appeared after start (idempotent)."""
        self._gpus.setdefault(info.gpu_uuid, _GpuState(info))

    def gpus(self) -> list[str]:
        """Every GPU metered: those of the source and those restored from a checkpoint."""
        return list(self._gpus)

    def knows(self, gpu_uuid: str) -> bool:
        return gpu_uuid in self._gpus

    def take_gpu_windows(self) -> list[GpuWindow]:
        """The GPU windows closed since the last call (with the windows ``add``/``flush`` returned)."""
        out, self._gpu_windows = self._gpu_windows, []
        return out

    def add(self, now_s: int, observations: list[Observation]) -> list[UsageWindow]:
        """Feed one sampling instant; return the windows this instant closed (their GPU windows:
        ``take_gpu_windows``)."""
        closed: list[UsageWindow] = []
        window_start = now_s - now_s % self.window_s
        for obs in observations:
            st = self._gpus[obs.gpu_uuid]
            if (st.last_sample_s is not None and now_s <= st.last_sample_s) or now_s < self.resume_s:
                self.samples_rejected += 1  # this instant (or a later one) is already counted
                continue
            if now_s % self.interval_s:  # off the interval grid: it would count an interval twice
                self.samples_rejected += 1
                continue
            previous = st.last_sample_s
            gap = previous is not None and now_s - previous > self.interval_s
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
                measured_for_other = obs.util_for not in ("*", st.last_holder)
                if gap or obs.util_percent is None or totals.busy_seconds is None or measured_for_other:
                    totals.busy_seconds = None  # the interval's use is not known: never a guess
                else:
                    totals.busy_seconds += obs.util_percent * self.interval_s / 100.0
                totals.measured = True
            if st.window_start_s is not None and st.window_start_s != window_start:
                closed.extend(self._close(st))
            if gap and previous is not None:
                self._close_unsampled(st, previous - previous % self.window_s + self.window_s, window_start)
                self.samples_skipped += (now_s - previous) // self.interval_s - 1
            st.window_start_s = window_start
            st.window_missed += missed_new
            st.last_energy_mj = obs.energy_mj_total
            st.last_holder = None if obs.missed else obs.firm_id
            if obs.missed:  # nobody is billed for an instant the device did not answer
                self.samples_missed += 1
                st.window_missed += 1
                st.window_unread += 1
                continue
            if obs.firm_id is None:
                st.window_idle += 1
                continue
            totals = st.firms.setdefault(obs.firm_id, _FirmTotals())
            totals.allocated_seconds += self.interval_s
            totals.measured = False  # this interval's use is read at the next sample
        return closed

    def _not_sampled(self, st: _GpuState, window_start: int, now_s: int) -> tuple[int, int]:
        """Sampling instants skipped between the GPU's last sample and ``now_s`` (a tick the loop
        missed, the agent down): (those in its open window, those in ``now_s``'s window). They are
        ``samples_missed``: nobody is billed for them and the record says so. Windows wholly inside
        the gap close as wholly unsampled GPU windows (``_close_unsampled``)."""
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

    def accounted_through_s(self) -> int:
        """The end of the latest window this accumulator has open or has closed (0: none)."""
        ends = [st.window_start_s + self.window_s for st in self._gpus.values() if st.window_start_s is not None]
        ends += [st.last_sample_s + self.interval_s for st in self._gpus.values() if st.last_sample_s is not None]
        return max([*ends, self.accounted_s])

    def resume_at(self, end_s: int) -> None:
        """Refuse instants before the first window boundary at or after ``end_s``: the time up to it
        was accounted under another cadence (the agent restarted with a new window or interval), and
        a window of this cadence that overlapped it would count its seconds twice."""
        self.accounted_s = max(self.accounted_s, end_s)
        self.resume_s = -(-self.accounted_s // self.window_s) * self.window_s

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
            "resume_s": self.resume_s,
            "accounted_s": self.accounted_s,
            "gpus": {
                uuid: {
                    "gpu_class": st.info.gpu_class,
                    "window_start_s": st.window_start_s,
                    "last_holder": st.last_holder,
                    "last_energy_mj": st.last_energy_mj,
                    "last_sample_s": st.last_sample_s,
                    "window_missed": st.window_missed,
                    "window_idle": st.window_idle,
                    "window_unread": st.window_unread,
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
        acc.resume_s, acc.accounted_s = int(snap.get("resume_s", 0)), int(snap.get("accounted_s", 0))
        for uuid, g in snap["gpus"].items():
            st = _GpuState(DeviceInfo(uuid, g["gpu_class"]), g["window_start_s"])
            st.last_holder, st.last_energy_mj = g["last_holder"], g["last_energy_mj"]
            st.last_sample_s = g["last_sample_s"]
            st.window_missed = int(g.get("window_missed", 0))  # absent in checkpoints of 0.1.0
            # absent before 0.3.0: the open window's idle and unread instants so far count as unsampled
            st.window_idle, st.window_unread = int(g.get("window_idle", 0)), int(g.get("window_unread", 0))
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
        """Forget open windows that end at or before ``end_s`` (already closed and spooled, with any
        gap windows after them up to ``end_s``: the next sample's gap starts there); count them."""
        dropped = 0
        for st in self._gpus.values():
            if st.window_start_s is not None and st.window_start_s + self.window_s <= end_s:
                dropped += len(st.firms)
                st.last_sample_s = max(st.last_sample_s or 0, end_s - self.interval_s)
                st.firms, st.window_start_s, st.last_holder = {}, None, None
                st.window_missed = st.window_idle = st.window_unread = 0
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
        allocated = sum(t.allocated_seconds for f, t in st.firms.items() if f != UNATTRIBUTED)
        unattributed = st.firms[UNATTRIBUTED].allocated_seconds if UNATTRIBUTED in st.firms else 0
        idle, unread = st.window_idle * self.interval_s, st.window_unread * self.interval_s
        # every instant the agent sampled is counted above, once: the rest of the window it did not sample
        unsampled = self.window_s - allocated - unattributed - idle - unread
        self._gpu_window(st, st.window_start_s, (allocated, unattributed, idle, unread, unsampled), len(out))
        st.firms = {}
        st.window_missed = st.window_idle = st.window_unread = 0
        return out

    def _close_unsampled(self, st: _GpuState, first_s: int, end_s: int) -> None:
        """GPU windows starting in [first_s, end_s) that no sample touched: wholly unsampled. Only
        the last ``MAX_GAP_WINDOWS`` of a longer gap; the pipeline reports the others as missing."""
        first_s = max(first_s, end_s - MAX_GAP_WINDOWS * self.window_s)
        for start_s in range(first_s, end_s, self.window_s):
            self._gpu_window(st, start_s, (0, 0, 0, 0, self.window_s), 0)

    def _gpu_window(self, st: _GpuState, start_s: int, seconds: tuple[int, int, int, int, int], records: int) -> None:
        allocated, unattributed, idle, unread, unsampled = seconds
        self._gpu_windows.append(
            {
                "seq": self.next_seq,
                "provider_id": self.host.provider_id,
                "host_id": self.host.host_id,
                "gpu_uuid": st.info.gpu_uuid,
                "gpu_class": st.info.gpu_class,
                "window_start": start_s * 1000,
                "window_end": (start_s + self.window_s) * 1000,
                "allocated_seconds": allocated,
                "unattributed_seconds": unattributed,
                "idle_seconds": idle,
                "unread_seconds": unread,
                "unsampled_seconds": unsampled,
                "usage_windows": records,
            }
        )
        self.next_seq += 1
