"""The one module that calls pynvml (nvidia-ml-py, pinned: see agent/README.md).

Every call goes through ``Nvml.query`` and its single error policy:

- "not supported", "no permission", other per-call errors: an explicit
  ``Unavailable`` value. It is not a number and cannot become one (no
  arithmetic, no truth value), so it can never be billed by accident;
- a function the driver lacks (or pynvml's library-mismatch error): logged once
  per function, then ``Unavailable``;
- GPU lost / reset required: ``GpuLost``; the caller marks that device failed;
- driver gone, not initialised, library/driver mismatch: ``NvmlDown``; the
  session shuts down and re-initialises with exponential backoff.

Devices are keyed by UUID, never by index. MIG instances are devices of their
own; their processes are read once on the parent and split by GPU instance id.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpumeter.errors import GpumeterError

log = logging.getLogger("gpumeter.agent.nvml")

# NVML return codes (nvml.h); the same numbers pynvml exposes as NVML_ERROR_*
NOT_SUPPORTED, NO_PERMISSION, NOT_FOUND = 3, 4, 6
UNINITIALIZED, DRIVER_NOT_LOADED, LIBRARY_NOT_FOUND, FUNCTION_NOT_FOUND = 1, 9, 12, 13
GPU_IS_LOST, RESET_REQUIRED, LIB_RM_VERSION_MISMATCH = 15, 16, 18
REINIT = {UNINITIALIZED, DRIVER_NOT_LOADED, LIBRARY_NOT_FOUND, LIB_RM_VERSION_MISMATCH}
LOST = {GPU_IS_LOST, RESET_REQUIRED}
NO_GPU_INSTANCE = 0xFFFFFFFF  # gpuInstanceId of a process on a GPU without MIG
# nvmlValueType_t -> the union member holding the value
VALUE_FIELDS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")


class GpuLost(GpumeterError):
    code = "gpu_lost"


class NvmlDown(GpumeterError):
    code = "nvml_down"


@dataclass(frozen=True, slots=True)
class Unavailable:
    """A value the device could not give, and why. Never a number."""

    reason: str

    def __bool__(self) -> bool:
        raise TypeError("Unavailable has no truth value: test isinstance(value, Unavailable)")


@dataclass(frozen=True, slots=True)
class GpuProcess:
    pid: int
    used_memory_bytes: int | None  # None: the driver does not say
    gpu_instance_id: int | None  # MIG GPU instance, None without MIG


@dataclass(slots=True)
class NvmlDevice:
    uuid: str
    name: str
    handle: Any
    memory_total_bytes: int | None
    parent_uuid: str | None = None  # set for a MIG instance
    gpu_instance_id: int | None = None
    mig_parent: bool = False  # a GPU in MIG mode: metered through its instances
    failed: str | None = None  # why the device is failed (GPU lost), None when healthy
    last_sample_us: int | None = None  # newest utilisation sample seen (gap-free sampling)
    use_samples: bool = True  # False once nvmlDeviceGetSamples proved unsupported
    memory_v2: bool = True  # False once nvmlDeviceGetMemoryInfo_v2 proved absent
    process_util: bool = True  # False once nvmlDeviceGetProcessUtilization proved unsupported
    generation: int = 0  # the NVML session that found it: what it lacks is retried after a re-init
    was_lost: bool = False  # found again by a rediscovery after it failed, not yet read since
    several_processes: bool = False  # more than one compute process at the last read


@dataclass(frozen=True, slots=True)
class Reading:
    """One device at one instant. ``failed`` set: nothing else is meaningful."""

    uuid: str
    util_percent: float | Unavailable
    memory_used_bytes: int | Unavailable
    power_mw: int | Unavailable
    energy_mj_total: int | Unavailable
    processes: tuple[GpuProcess, ...] | Unavailable
    failed: str | None = None
    # per process, its SM utilisation (%) over the same interval as ``util_percent``; read only when
    # several processes ran at either end of it (``None``: not read), a process absent used none
    process_util: dict[int, int] | Unavailable | None = None


@dataclass
class Nvml:
    """An NVML session: the choke point, re-initialisation with backoff, device discovery."""

    lib: Any = None  # the pynvml module (or a fake with the same names)
    clock: Callable[[], float] = time.monotonic
    backoff_min_s: float = 1.0
    backoff_max_s: float = 60.0
    up: bool = False
    generation: int = 0  # +1 per successful init: energy counters restart from zero on a driver reload
    errors: Counter[str] = field(default_factory=Counter)  # by kind, for self-metrics
    devices: dict[str, NvmlDevice] = field(default_factory=dict)
    last_error: str = ""
    last_error_code: int | None = None
    _logged: set[str] = field(default_factory=set)
    _retry_at: float = 0.0
    _delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.lib is None:
            import pynvml

            self.lib = pynvml

    # --- the choke point --------------------------------------------------
    def query(self, func: str, *args: Any, label: str | None = None) -> Any:
        """Call ``lib.func(*args)``: the value, or ``Unavailable``; raises GpuLost / NvmlDown."""
        name = label or func
        fn = getattr(self.lib, func, None)
        if fn is None:
            return self._missing(name)
        try:
            return fn(*args)
        except self.lib.NVMLLibraryMismatchError:
            return self._missing(name)
        except self.lib.NVMLError as exc:
            code = int(exc.value)
            if code == FUNCTION_NOT_FOUND:
                return self._missing(name)
            if code == NOT_FOUND:  # e.g. no new samples since the timestamp: information, not failure
                return Unavailable("not found")
            if code == NOT_SUPPORTED:
                self.errors["not_supported"] += 1
                return Unavailable("not supported")
            if code in LOST:
                self.errors["gpu_lost"] += 1
                raise GpuLost(f"{name}: {exc}") from exc
            if code in REINIT:
                self.errors["reinit"] += 1
                raise NvmlDown(f"{name}: {exc}") from exc
            self.errors["other"] += 1
            self._once(f"{name}:{code}", logging.WARNING, "%s failed: %s (code %d); value unavailable", name, exc, code)
            return Unavailable(str(exc))

    def _missing(self, name: str) -> Unavailable:
        self.errors["function_not_found"] += 1
        self._once(name, logging.WARNING, "NVML function %s not in this driver; value unavailable", name)
        return Unavailable(f"function not found: {name}")

    def _once(self, key: str, level: int, msg: str, *args: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.log(level, msg, *args)

    # --- session ------------------------------------------------------------
    def ensure(self) -> bool:
        """Initialised (and devices discovered)? Tries again only when the backoff allows."""
        if self.up:
            return True
        if self.clock() < self._retry_at:
            return False
        try:
            self.lib.nvmlInit()
            self.up = True
            self.generation += 1
            self.discover()
        except (self.lib.NVMLError, NvmlDown, GpuLost, OSError) as exc:
            self.last_error_code = getattr(exc, "value", None)
            self.mark_down(f"init failed: {exc}")
            return False
        log.info("NVML initialised (generation %d): %d device(s)", self.generation, len(self.devices))
        self._delay_s = 0.0
        return True

    def mark_down(self, reason: str) -> None:
        """Shut the session and schedule a re-init: 1 s, 2 s, 4 s ... up to backoff_max_s."""
        if self.up:
            with contextlib.suppress(Exception):  # a dead driver may refuse even this; we re-init anyway
                self.lib.nvmlShutdown()
        self.up = False
        self.last_error = reason
        self._delay_s = min(self.backoff_max_s, max(self.backoff_min_s, self._delay_s * 2))
        self._retry_at = self.clock() + self._delay_s
        self.errors["down"] += 1
        log.error("NVML down (%s); re-initialising in %.0f s", reason, self._delay_s)

    def discover(self) -> None:
        """(Re)read every device by index into ``devices`` keyed by UUID; MIG instances included."""
        count = self.query("nvmlDeviceGetCount")
        if isinstance(count, Unavailable):
            raise NvmlDown(f"cannot count devices: {count.reason}")
        for index in range(count):
            try:
                handle = self.query("nvmlDeviceGetHandleByIndex", index)
                if isinstance(handle, Unavailable):
                    continue
                dev = self._device(handle, None, None)
                mig = self.query("nvmlDeviceGetMigMode", handle)
                if not isinstance(mig, Unavailable) and mig[0] == 1:
                    dev.mig_parent = True
                    self._discover_mig(dev)
            except GpuLost as exc:
                log.error("device index %d lost during discovery: %s", index, exc)
                continue
            self._keep(dev)

    def _discover_mig(self, parent: NvmlDevice) -> None:
        slots = self.query("nvmlDeviceGetMaxMigDeviceCount", parent.handle)
        for i in range(0 if isinstance(slots, Unavailable) else slots):
            h = self.query("nvmlDeviceGetMigDeviceHandleByIndex", parent.handle, i)
            if isinstance(h, Unavailable):
                continue  # empty slot
            gi = self.query("nvmlDeviceGetGpuInstanceId", h)
            self._keep(self._device(h, parent.uuid, None if isinstance(gi, Unavailable) else int(gi)))

    def _device(self, handle: Any, parent_uuid: str | None, gi: int | None) -> NvmlDevice:
        uuid = self.query("nvmlDeviceGetUUID", handle)
        if isinstance(uuid, Unavailable):
            raise GpuLost(f"device without a UUID ({uuid.reason})")
        name = self.query("nvmlDeviceGetName", handle)
        mem = self._memory(handle, None)
        return NvmlDevice(
            uuid=_text(uuid),
            name="unknown" if isinstance(name, Unavailable) else _text(name),
            handle=handle,
            memory_total_bytes=None if isinstance(mem, Unavailable) else int(mem.total),
            parent_uuid=parent_uuid,
            gpu_instance_id=gi,
            generation=self.generation,
        )

    def _keep(self, dev: NvmlDevice) -> None:
        """A rediscovered device is tried again; it is back once a read succeeds (``read``). What its
        earlier reads learnt carries over: the last sample seen (so the next interval starts where the
        last ended), whether several processes ran at the last read, and - in the same NVML session
        only (a re-init may follow a driver upgrade) - the functions it lacks."""
        old = self.devices.get(dev.uuid)
        if old is not None:
            dev.was_lost = old.was_lost or old.failed is not None
            dev.last_sample_us, dev.several_processes = old.last_sample_us, old.several_processes
            if old.generation == dev.generation:
                dev.use_samples, dev.memory_v2, dev.process_util = old.use_samples, old.memory_v2, old.process_util
        self.devices[dev.uuid] = dev

    # --- readings -----------------------------------------------------------
    def read(self, now_us: int, interval_us: int) -> list[Reading]:
        """Read every metered device (MIG parents are metered through their instances)."""
        out: list[Reading] = []
        procs_by_parent: dict[str, tuple[GpuProcess, ...] | Unavailable] = {}
        for dev in list(self.devices.values()):
            if dev.mig_parent:
                continue
            if dev.failed:
                out.append(_failed(dev))
                continue
            try:
                if dev.parent_uuid is None:
                    procs = self._processes(dev.handle)
                else:
                    parent = self.devices[dev.parent_uuid]
                    if parent.uuid not in procs_by_parent:
                        procs_by_parent[parent.uuid] = self._processes(parent.handle)
                    procs = _instance_processes(procs_by_parent[parent.uuid], dev.gpu_instance_id)
                out.append(self._read_one(dev, procs, now_us, interval_us))
                if dev.was_lost:
                    log.warning("GPU %s is back", dev.uuid)
                    dev.was_lost = False
            except GpuLost as exc:
                dev.failed = str(exc)
                # said once: a GPU that stays lost is tried again at each rediscovery, quietly
                level = logging.DEBUG if dev.was_lost else logging.ERROR
                log.log(level, "GPU %s lost (%s): its samples count as missed until it is back", dev.uuid, exc)
                out.append(_failed(dev))
        return out

    def _read_one(
        self, dev: NvmlDevice, procs: tuple[GpuProcess, ...] | Unavailable, now_us: int, interval_us: int
    ) -> Reading:
        mem = self._memory(dev.handle, dev)
        power = self.query("nvmlDeviceGetPowerUsage", dev.handle)
        energy = self.query("nvmlDeviceGetTotalEnergyConsumption", dev.handle)
        # the interval this reading measures: from the last driver sample seen, when that is the previous
        # reading's (never one older than a gap, nor one ahead of the clock), else the last interval
        last = dev.last_sample_us if dev.use_samples else None
        since = last if last is not None and now_us - 2 * interval_us <= last <= now_us else now_us - interval_us
        several = not isinstance(procs, Unavailable) and len(procs) > 1
        shared_interval, dev.several_processes = (several or dev.several_processes) and dev.process_util, several
        return Reading(
            uuid=dev.uuid,
            util_percent=self._utilisation(dev, since),
            memory_used_bytes=mem if isinstance(mem, Unavailable) else int(mem.used),
            power_mw=power if isinstance(power, Unavailable) else int(power),
            energy_mj_total=energy if isinstance(energy, Unavailable) else int(energy),
            processes=procs,
            process_util=self._process_utilisation(dev, since) if shared_interval else None,
        )

    def _process_utilisation(self, dev: NvmlDevice, since: int) -> dict[int, int] | Unavailable:
        """Per process, the mean SM utilisation of the driver's samples after ``since`` (the same
        interval as the GPU's ``_utilisation``); the driver lists only processes that used the GPU,
        and "not found" when none did. A MIG instance has no per-process figures (not supported)."""
        if dev.parent_uuid is not None:
            return Unavailable("not supported on a MIG instance")
        got = self.query("nvmlDeviceGetProcessUtilization", dev.handle, since)
        if isinstance(got, Unavailable):
            if got.reason == "not supported" or got.reason.startswith("function not found"):
                dev.process_util = False  # not on this device: not asked again (until a re-init)
            return {} if got.reason == "not found" else got
        newest: dict[int, tuple[int, int]] = {}  # pid -> (timestamp, SM %): a pid listed twice, its newest
        for entry in got:
            pid, stamp, util = int(entry.pid), int(entry.timeStamp), int(entry.smUtil)
            if util > 100:  # a driver returning garbage (seen in the field): none of it is evidence
                return Unavailable(f"per-process utilisation {util} % is not a percentage")
            if pid > 0 and stamp > since and stamp >= newest.get(pid, (0, 0))[0]:
                newest[pid] = (stamp, util)
        return {pid: util for pid, (_, util) in newest.items()}

    def _utilisation(self, dev: NvmlDevice, since: int) -> float | Unavailable:
        """Mean of the driver's samples since the last one seen (gap-free); else the current rate."""
        if dev.use_samples:
            got = self.query("nvmlDeviceGetSamples", dev.handle, self.lib.NVML_GPU_UTILIZATION_SAMPLES, since)
            if not isinstance(got, Unavailable):
                value_type, samples = got
                fresh = [s for s in samples if s.timeStamp > since]
                if fresh:
                    dev.last_sample_us = max(s.timeStamp for s in fresh)
                    attr = VALUE_FIELDS[value_type] if 0 <= value_type < len(VALUE_FIELDS) else "uiVal"
                    return sum(float(getattr(s.sampleValue, attr)) for s in fresh) / len(fresh)
            elif got.reason == "not supported" or got.reason.startswith("function not found"):
                dev.use_samples = False  # not on this device: the rate from now on (until a re-init)
                dev.last_sample_us = None
        rates = self.query("nvmlDeviceGetUtilizationRates", dev.handle)
        return rates if isinstance(rates, Unavailable) else float(rates.gpu)

    def _memory(self, handle: Any, dev: NvmlDevice | None) -> Any:
        if dev is None or dev.memory_v2:
            got = self.query(
                "nvmlDeviceGetMemoryInfo", handle, self.lib.nvmlMemory_v2, label="nvmlDeviceGetMemoryInfo_v2"
            )
            if not (isinstance(got, Unavailable) and got.reason.startswith("function not found")):
                return got
            if dev is not None:
                dev.memory_v2 = False
        return self.query("nvmlDeviceGetMemoryInfo", handle)

    def _processes(self, handle: Any) -> tuple[GpuProcess, ...] | Unavailable:
        """Running compute processes (the _v3 symbol, 24-byte entries in this pinned pynvml)."""
        got = self.query("nvmlDeviceGetComputeRunningProcesses", handle)
        if isinstance(got, Unavailable):
            return got
        return tuple(
            GpuProcess(
                pid=int(p.pid),
                used_memory_bytes=None if p.usedGpuMemory is None else int(p.usedGpuMemory),
                gpu_instance_id=None
                if getattr(p, "gpuInstanceId", NO_GPU_INSTANCE) == NO_GPU_INSTANCE
                else int(p.gpuInstanceId),
            )
            for p in got
            if int(p.pid) > 0
        )


def _instance_processes(
    procs: tuple[GpuProcess, ...] | Unavailable, gpu_instance_id: int | None
) -> tuple[GpuProcess, ...] | Unavailable:
    if isinstance(procs, Unavailable) or gpu_instance_id is None:
        return procs if isinstance(procs, Unavailable) else Unavailable("MIG instance id unknown")
    return tuple(p for p in procs if p.gpu_instance_id == gpu_instance_id)


def _failed(dev: NvmlDevice) -> Reading:
    lost = Unavailable(f"device failed: {dev.failed}")
    return Reading(dev.uuid, lost, lost, lost, lost, lost, failed=dev.failed)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
