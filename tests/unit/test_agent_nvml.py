"""agent.nvml against a fake at the pynvml boundary: same function names, pynvml's own error classes."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from agent.devices import DeviceInfo
from agent.nvml import GpuLost, Nvml, Unavailable
from agent.nvml_source import NvmlSource, gpu_class_for, holder
from agent.runner import Agent
from agent.windows import HostIdentity

NOT_SUPPORTED, NOT_FOUND, UNINITIALIZED, DRIVER_NOT_LOADED = 3, 6, 1, 9
FUNCTION_NOT_FOUND, GPU_IS_LOST, LIB_RM_VERSION_MISMATCH = 13, 15, 18


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    total: int = 81559 * 2**20
    used: int = 2**30
    power_mw: int = 300_000
    energy_mj: int = 0
    util: int = 40
    samples: list[tuple[int, int]] = field(default_factory=list)  # (timestamp us, util %)
    procs: list[tuple[int, int | None, int]] = field(default_factory=list)  # (pid, bytes, gpu instance)
    mig: list[FakeGpu] | None = None
    gi: int | None = None
    proc_util: dict[int, int] | None = None  # per pid SM % over the interval; None: no per-process figures


class FakePynvml:
    """The slice of the pynvml module agent.nvml uses. ``fail[(func, uuid or '*')] = code`` injects errors."""

    NVMLError = pynvml.NVMLError
    NVMLLibraryMismatchError = pynvml.NVMLLibraryMismatchError
    NVML_GPU_UTILIZATION_SAMPLES = pynvml.NVML_GPU_UTILIZATION_SAMPLES
    nvmlMemory_v2 = pynvml.nvmlMemory_v2

    def __init__(self, gpus: list[FakeGpu]) -> None:
        self.gpus = gpus
        self.fail: dict[tuple[str, str], int] = {}
        self.missing: set[str] = set()
        self.mismatch: set[str] = set()
        self.initialised = False
        self.calls: Counter[str] = Counter()
        self.process_since: list[int] = []  # lastSeenTimeStamp of each per-process utilisation call

    def _check(self, func: str, gpu: FakeGpu | None = None) -> None:
        self.calls[func] += 1
        if func in self.missing:
            raise pynvml.NVMLError(FUNCTION_NOT_FOUND)
        if func in self.mismatch:
            raise pynvml.NVMLLibraryMismatchError("unversioned function and library differ")
        code = self.fail.get((func, gpu.uuid if gpu else "*")) or self.fail.get((func, "*"))
        if code:
            raise pynvml.NVMLError(code)
        if not self.initialised and func != "nvmlInit":
            raise pynvml.NVMLError(UNINITIALIZED)

    def nvmlInit(self) -> None:
        self._check("nvmlInit")
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        self._check("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeGpu:
        self._check("nvmlDeviceGetHandleByIndex")
        return self.gpus[i]

    def nvmlDeviceGetUUID(self, h: FakeGpu) -> str:
        self._check("nvmlDeviceGetUUID", h)
        return h.uuid

    def nvmlDeviceGetName(self, h: FakeGpu) -> bytes:
        self._check("nvmlDeviceGetName", h)
        return h.name.encode()

    def nvmlDeviceGetMigMode(self, h: FakeGpu) -> list[int]:
        self._check("nvmlDeviceGetMigMode", h)
        if h.mig is None:
            raise pynvml.NVMLError(NOT_SUPPORTED)
        return [1, 1]

    def nvmlDeviceGetMaxMigDeviceCount(self, h: FakeGpu) -> int:
        self._check("nvmlDeviceGetMaxMigDeviceCount", h)
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: FakeGpu, i: int) -> FakeGpu:
        self._check("nvmlDeviceGetMigDeviceHandleByIndex", h)
        assert h.mig is not None
        if i >= len(h.mig):
            raise pynvml.NVMLError(NOT_FOUND)
        return h.mig[i]

    def nvmlDeviceGetGpuInstanceId(self, h: FakeGpu) -> int:
        self._check("nvmlDeviceGetGpuInstanceId", h)
        assert h.gi is not None
        return h.gi

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu, version: int | None = None) -> Any:
        self._check("nvmlDeviceGetMemoryInfo_v2" if version else "nvmlDeviceGetMemoryInfo", h)
        return SimpleNamespace(total=h.total, used=h.used, free=h.total - h.used)

    def nvmlDeviceGetPowerUsage(self, h: FakeGpu) -> int:
        self._check("nvmlDeviceGetPowerUsage", h)
        return h.power_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, h: FakeGpu) -> int:
        self._check("nvmlDeviceGetTotalEnergyConsumption", h)
        return h.energy_mj

    def nvmlDeviceGetUtilizationRates(self, h: FakeGpu) -> Any:
        self._check("nvmlDeviceGetUtilizationRates", h)
        return SimpleNamespace(gpu=h.util, memory=10)

    def nvmlDeviceGetSamples(self, h: FakeGpu, kind: int, since_us: int) -> Any:
        self._check("nvmlDeviceGetSamples", h)
        assert kind == pynvml.NVML_GPU_UTILIZATION_SAMPLES
        fresh = [(t, v) for t, v in h.samples if t > since_us]
        if not fresh:
            raise pynvml.NVMLError(NOT_FOUND)  # what the driver says when nothing is new
        return 1, [SimpleNamespace(timeStamp=t, sampleValue=SimpleNamespace(uiVal=v)) for t, v in fresh]

    def nvmlDeviceGetProcessUtilization(self, h: FakeGpu, since_us: int) -> list[Any]:
        self._check("nvmlDeviceGetProcessUtilization", h)
        self.process_since.append(since_us)
        if h.proc_util is None:
            raise pynvml.NVMLError(NOT_SUPPORTED)
        used = {pid: u for pid, u in h.proc_util.items() if u > 0}  # the driver lists only processes that ran
        if not used:
            raise pynvml.NVMLError(NOT_FOUND)
        return [SimpleNamespace(pid=pid, timeStamp=since_us + 1, smUtil=u) for pid, u in used.items()]

    def nvmlDeviceGetComputeRunningProcesses(self, h: FakeGpu) -> list[Any]:
        self._check("nvmlDeviceGetComputeRunningProcesses", h)
        return [SimpleNamespace(pid=p, usedGpuMemory=m, gpuInstanceId=gi, computeInstanceId=0) for p, m, gi in h.procs]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


NO_GI = 0xFFFFFFFF
FIRMS = {101: "F1", 102: "F2", 103: "F1"}


def resolve(pid: int, gpu_uuid: str) -> str:
    return FIRMS.get(pid, "unattributed")


def make(gpus: list[FakeGpu]) -> tuple[FakePynvml, Nvml, NvmlSource, Clock]:
    lib, clock = FakePynvml(gpus), Clock()
    nvml = Nvml(lib=lib, clock=clock)
    return lib, nvml, NvmlSource(nvml, resolve, interval_s=1, clock=clock), clock


def test_devices_are_keyed_by_uuid_and_classed_from_their_names() -> None:
    _, _, src, _ = make([FakeGpu("GPU-a"), FakeGpu("GPU-b", name="NVIDIA L40S", total=46068 * 2**20)])
    assert src.devices() == [DeviceInfo("GPU-a", "H100-80G"), DeviceInfo("GPU-b", "L40S-48G")]


def test_not_supported_is_an_explicit_unavailable_that_never_becomes_a_number() -> None:
    lib, nvml, src, _ = make([FakeGpu("GPU-a", procs=[(101, 2**30, NO_GI)])])
    lib.fail[("nvmlDeviceGetTotalEnergyConsumption", "*")] = NOT_SUPPORTED
    lib.fail[("nvmlDeviceGetPowerUsage", "*")] = NOT_SUPPORTED
    (reading,) = nvml.read(10_000_000, 1_000_000)
    assert reading.energy_mj_total == Unavailable("not supported")
    assert reading.power_mw == Unavailable("not supported")
    with pytest.raises(TypeError):
        reading.power_mw + 1  # type: ignore[operator]
    with pytest.raises(TypeError):
        bool(reading.power_mw)
    with pytest.raises(TypeError):
        float(reading.power_mw)  # type: ignore[arg-type]
    (obs,) = src.observe(11)
    assert (obs.firm_id, obs.energy_mj_total, obs.missed) == ("F1", None, False)
    assert nvml.errors["not_supported"] >= 2


def test_gpu_lost_fails_that_device_only_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    a = FakeGpu("GPU-a", procs=[(101, 1, NO_GI)])
    b = FakeGpu("GPU-b", procs=[(102, 1, NO_GI)])
    lib, nvml, src, clock = make([a, b])
    lib.fail[("nvmlDeviceGetComputeRunningProcesses", "GPU-a")] = GPU_IS_LOST
    with caplog.at_level(logging.ERROR, "gpumeter.agent.nvml"):
        obs = src.observe(10)
    assert [(o.gpu_uuid, o.firm_id, o.missed) for o in obs] == [("GPU-a", None, True), ("GPU-b", "F2", False)]
    assert nvml.devices["GPU-a"].failed and "GPU GPU-a lost" in caplog.text
    calls = lib.calls["nvmlDeviceGetPowerUsage"]
    src.observe(11)  # a failed device is not queried again until rediscovered
    assert lib.calls["nvmlDeviceGetPowerUsage"] == calls + 1
    caplog.clear()
    with caplog.at_level(logging.DEBUG, "gpumeter.agent.nvml"):
        for n in range(1, 4):  # still lost at three rediscoveries: tried again each time, said once
            clock.t += 60
            src.observe(11 + 60 * n)
    assert "GPU-a is back" not in caplog.text and [r.levelno for r in caplog.records if "lost" in r.message] == [10] * 3
    del lib.fail[("nvmlDeviceGetComputeRunningProcesses", "GPU-a")]
    clock.t += 60  # rediscovery interval
    with caplog.at_level(logging.WARNING, "gpumeter.agent.nvml"):
        obs = src.observe(252)
    assert [(o.firm_id, o.missed) for o in obs] == [("F1", False), ("F2", False)]
    assert "GPU GPU-a is back" in caplog.text
    assert src.samples_missed == 5


def test_driver_reload_reinitialises_with_backoff_and_the_energy_counter_reset_is_never_billed() -> None:
    gpu = FakeGpu("GPU-a", energy_mj=5_000_000, procs=[(101, 1, NO_GI)])
    lib, nvml, src, clock = make([gpu])
    sink = Collect()
    meter = Agent(src, HostIdentity("P01", "h1"), sink, window_s=60, interval_s=1)
    meter.sample(60)
    gpu.energy_mj += 300_000
    meter.sample(61)
    # the driver goes away: every call says so
    lib.initialised = False
    lib.fail[("nvmlInit", "*")] = DRIVER_NOT_LOADED
    meter.sample(62)
    assert nvml.up is False and nvml.errors["reinit"] == 1
    clock.t += 0.5
    meter.sample(63)  # backoff (1 s) not over: no init attempt
    assert lib.calls["nvmlInit"] == 1
    clock.t += 1
    meter.sample(64)  # tried, failed again: next delay 2 s
    assert lib.calls["nvmlInit"] == 2 and nvml.up is False
    del lib.fail[("nvmlInit", "*")]
    gpu.energy_mj = 1_000  # driver reloaded: counter restarted from zero
    clock.t += 2
    meter.sample(65)
    assert nvml.up and nvml.generation == 2 and lib.calls["nvmlInit"] == 3
    gpu.energy_mj += 400_000
    meter.sample(66)
    gpu.energy_mj += 400_000
    meter.sample(120)
    windows = {w["window_start"]: w for w in sink.windows}
    w60 = windows[60_000]
    assert w60["allocated_seconds"] == 4  # 60, 61, 65, 66: the down samples are missed, not billed
    assert w60["energy_joules"] is None  # a reset window has no energy figure
    assert meter.acc.samples_missed == 3


def test_a_missing_function_is_logged_once_and_memory_falls_back_to_v1(caplog: pytest.LogCaptureFixture) -> None:
    lib, nvml, _, _ = make([FakeGpu("GPU-a", procs=[(101, 1, NO_GI)])])
    lib.missing |= {"nvmlDeviceGetMemoryInfo_v2", "nvmlDeviceGetPowerUsage"}
    v2_calls = lib.calls["nvmlDeviceGetMemoryInfo_v2"]
    with caplog.at_level(logging.WARNING, "gpumeter.agent.nvml"):
        readings = [nvml.read(t * 1_000_000, 1_000_000)[0] for t in range(10, 15)]
    assert all(r.memory_used_bytes == 2**30 for r in readings)
    assert all(isinstance(r.power_mw, Unavailable) for r in readings)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert lines == [
        "NVML function nvmlDeviceGetMemoryInfo_v2 not in this driver; value unavailable",
        "NVML function nvmlDeviceGetPowerUsage not in this driver; value unavailable",
    ]
    assert lib.calls["nvmlDeviceGetMemoryInfo_v2"] == v2_calls + 1  # v2 not tried again on that device


def test_library_mismatch_on_processes_means_missed_samples_not_a_guess() -> None:
    lib, _, src, _ = make([FakeGpu("GPU-a", procs=[(101, 1, NO_GI)])])
    lib.mismatch.add("nvmlDeviceGetComputeRunningProcesses")
    (obs,) = src.observe(10)
    assert (obs.firm_id, obs.missed) == (None, True)


def test_utilisation_comes_from_samples_since_the_last_seen_timestamp() -> None:
    gpu = FakeGpu("GPU-a", util=99)
    gpu.samples = [(8_500_000, 90), (9_100_000, 10), (9_600_000, 30)]
    lib, nvml, _, _ = make([gpu])
    assert nvml.read(10_000_000, 1_000_000)[0].util_percent == 20.0  # (10 + 30) / 2: since 9.0 s
    gpu.samples += [(10_100_000, 50), (10_600_000, 70)]
    assert nvml.read(11_000_000, 1_000_000)[0].util_percent == 60.0  # only the two newer ones
    assert nvml.devices["GPU-a"].last_sample_us == 10_600_000
    # nothing new since: NOT_FOUND -> the current rate, and samples are tried again next time
    assert nvml.read(12_000_000, 1_000_000)[0].util_percent == 99.0
    gpu.samples.append((12_500_000, 5))
    assert nvml.read(13_000_000, 1_000_000)[0].util_percent == 5.0
    lib.fail[("nvmlDeviceGetSamples", "*")] = NOT_SUPPORTED
    assert nvml.read(14_000_000, 1_000_000)[0].util_percent == 99.0
    del lib.fail[("nvmlDeviceGetSamples", "*")]
    calls = lib.calls["nvmlDeviceGetSamples"]
    nvml.read(15_000_000, 1_000_000)
    assert lib.calls["nvmlDeviceGetSamples"] == calls  # unsupported once: rates from then on


class Collect:
    def __init__(self) -> None:
        self.windows: list[dict[str, Any]] = []
        self.gpu_windows: list[dict[str, Any]] = []

    def send(self, host_id: str, agent_version: str, windows: list[dict[str, Any]], gpu_windows: Any) -> None:
        self.windows.extend(windows)
        self.gpu_windows.extend(gpu_windows)


def test_process_churn_moves_the_gpu_between_firms_and_unresolved_time_is_unattributed() -> None:
    gpu = FakeGpu("GPU-a")
    _, _, src, _ = make([gpu])
    sink = Collect()
    meter = Agent(src, HostIdentity("P01", "h1"), sink, window_s=10, interval_s=1)
    timeline: list[list[tuple[int, int | None, int]]] = [
        [],
        [(101, 5, NO_GI)],
        [(101, 5, NO_GI), (103, 1, NO_GI)],
        [(102, 9, NO_GI)],
        [(999, 1, NO_GI)],
    ]
    for t in range(20):
        gpu.procs = timeline[t // 4]
        meter.sample(t)
    meter.stop()
    got = sorted((w["window_start"] // 1000, w["firm_id"], w["allocated_seconds"]) for w in sink.windows)
    assert got == [(0, "F1", 6), (10, "F1", 2), (10, "F2", 4), (10, "unattributed", 4)]


@pytest.mark.parametrize(
    ("procs", "expected"),
    [
        ([], (None, False)),
        ([(101, 5)], ("F1", False)),
        ([(101, 1), (102, 2)], ("F2", True)),  # most memory holds the sample
        ([(101, 2), (102, 2)], ("F1", True)),  # tie: lowest firm id
        ([(101, None), (999, None)], ("F1", True)),  # memory unknown: 0 each, tie
    ],
    ids=["idle", "one", "memory-wins", "tie-by-id", "memory-unknown"],
)
def test_holder_rule(procs: list[tuple[int, int | None]], expected: tuple[str | None, bool]) -> None:
    from agent.nvml import GpuProcess

    ps = tuple(GpuProcess(pid, mem, None) for pid, mem in procs)
    assert holder(ps, lambda pid: resolve(pid, "GPU-a")) == expected


def test_the_utilisation_of_an_interval_several_firms_shared_is_never_the_holders() -> None:
    """F1 (more memory) holds GPU-a while F2's process shares it at 11: the driver's 90 % may be
    both firms' use, so the intervals ending and starting at 11 are unknown for F1, never F2's use
    billed as F1's. Alone again from 12, F1's intervals are measured again."""

    gpu = FakeGpu("GPU-a", util=90)
    _, _, src, _ = make([gpu])
    utils = []
    for t in range(10, 23):
        gpu.procs = [(101, 2**30, NO_GI), (102, 1, NO_GI)] if t == 11 else [(101, 2**30, NO_GI)]
        utils.append(src.observe(t)[0].util_percent)
    assert utils == [90.0, None, None, *[90.0] * 10] and src.shared_samples == 1  # [10, 11) and [11, 12)
    gpu = FakeGpu("GPU-a", util=90)
    _, _, src, _ = make([gpu])
    sink = Collect()
    meter = Agent(src, HostIdentity("P01", "h1"), sink, window_s=10, interval_s=1)
    for t in range(10, 31):
        gpu.procs = [(101, 2**30, NO_GI), (102, 1, NO_GI)] if t == 21 else [(101, 2**30, NO_GI)]
        meter.sample(t)
    busy = {w["window_start"] // 1000: w["busy_seconds"] for w in sink.windows}
    # window 10 measured through (10 x 0.9); window 20, closed by the sample at 30, holds the shared interval
    assert busy == {10: 9.0, 20: None}


def test_a_shared_interval_is_credited_the_holders_own_use_from_per_process_figures() -> None:
    """F1 (more memory) holds GPU-a and F2's process shares it from 11 to 14; the GPU is 90 % busy,
    F1's processes 101 and 103 used 40 % and 25 % of it. Where F1's processes are the same at both
    ends of an interval, F1 is credited its own 65 %, not the GPU's 90 %; where one of F1's processes
    came or went inside the interval, the per-process figures cover a span we cannot tell: unknown.
    A process of another firm coming and going does not matter. Read only while several processes run."""
    gpu = FakeGpu("GPU-a", util=90)
    lib, _, src, _ = make([gpu])
    f1 = [(101, 2**30, NO_GI), (103, 2**30, NO_GI)]
    utils = []
    for t in range(10, 18):
        gpu.procs = [*f1, (102, 1, NO_GI)] if 11 <= t < 14 else f1 if t != 16 else f1[:1]
        gpu.proc_util = {101: 40, 103: 25, 102: 30} if 11 <= t <= 14 else {101: 40, 103: 25}
        utils.append(src.observe(t)[0].util_percent)  # at t: the interval [t - 1, t)
    # shared at either end: [10, 11) .. [13, 14), F1's own 65; alone at both ends: the GPU's 90, even
    # where F1's 103 went away ([15, 16), [16, 17)): no other firm ran, all of it was F1's
    assert utils == [90.0, 65.0, 65.0, 65.0, 65.0, 90.0, 90.0, 90.0]
    # per-process figures are read only for intervals with several processes at either end
    assert lib.calls["nvmlDeviceGetProcessUtilization"] == 8  # f1 has two processes throughout

    gpu = FakeGpu("GPU-b", util=90, proc_util={101: 40, 102: 30})
    _, _, src, _ = make([gpu])
    utils = []
    for t in range(10, 15):
        # F1's 101 throughout; F1's 103 only at 12: the intervals [11, 12) and [12, 13) change F1's processes
        gpu.procs = [(101, 2**30, NO_GI), (102, 1, NO_GI)] + ([(103, 1, NO_GI)] if t == 12 else [])
        utils.append(src.observe(t)[0].util_percent)
    assert utils == [None, 40.0, None, None, 40.0]

    gpu = FakeGpu("GPU-d", util=90, proc_util={101: 70, 103: 60})  # F1's own 130 %: at most the GPU's 90
    _, _, src, _ = make([gpu])
    gpu.procs = [(101, 2**30, NO_GI), (102, 1, NO_GI), (103, 2**30, NO_GI)]
    assert [src.observe(t)[0].util_percent for t in (10, 11)] == [None, 90.0]
    gpu.proc_util = {101: 170}  # garbage from the driver: none of it is evidence
    assert src.observe(12)[0].util_percent is None

    gpu = FakeGpu("GPU-c", util=90, proc_util={})  # busy, yet no process used it: the figures disagree
    _, _, src, _ = make([gpu])
    gpu.procs = [(101, 2**30, NO_GI), (102, 1, NO_GI)]
    assert [src.observe(t)[0].util_percent for t in (10, 11)] == [None, None]
    gpu.util = 0  # idle, and no process used it: F1's own use is 0
    assert src.observe(12)[0].util_percent == 0.0


def test_per_process_figures_cover_the_interval_of_the_gpus_and_are_read_only_when_shared() -> None:
    """The per-process call asks for the samples after the same driver sample as the GPU's figure;
    a GetSamples error that is not "not supported" does not freeze that timestamp; with one process
    at both ends of an interval nothing per process is read; a GPU that has no per-process figures
    is not asked again."""
    gpu = FakeGpu("GPU-a", util=50, proc_util={101: 20, 102: 30})
    lib, _, src, _ = make([gpu])
    for t in range(10, 20):
        gpu.samples = [(t * 1_000_000 - 500_000, 50), (t * 1_000_000 - 100_000, 50)]
        gpu.procs = [(101, 2**30, NO_GI), (102, 1, NO_GI)] if 12 <= t < 15 else [(101, 2**30, NO_GI)]
        if t == 16:
            lib.fail[("nvmlDeviceGetSamples", "GPU-a")] = 999  # a one-off error: the rate this time
        src.observe(t)
        lib.fail.clear()
    # read at 12, 13, 14 (several now) and 15 (several at the interval's start); never at 16-19
    assert lib.process_since == [t * 1_000_000 - 1_100_000 for t in (12, 13, 14, 15)]
    gpu.procs = [(101, 2**30, NO_GI), (102, 1, NO_GI)]
    for t in (20, 21):
        gpu.samples = [(t * 1_000_000 - 500_000, 50), (t * 1_000_000 - 100_000, 50)]
        src.observe(t)
    assert lib.process_since[-2:] == [20 * 1_000_000 - 1_100_000, 21 * 1_000_000 - 1_100_000]  # not frozen at 16
    gpu.proc_util = None  # this GPU has none: not supported, asked once more, then never
    for t in (22, 23, 24):
        src.observe(t)
    assert lib.calls["nvmlDeviceGetProcessUtilization"] == 7


def test_mig_instances_are_devices_of_their_own_with_processes_split_by_instance() -> None:
    inst1 = FakeGpu("MIG-1", name="NVIDIA H100 80GB HBM3 MIG 3g.40gb", gi=1)
    inst2 = FakeGpu("MIG-2", name="NVIDIA H100 80GB HBM3 MIG 1g.10gb", gi=2)
    parent = FakeGpu("GPU-p", mig=[inst1, inst2], procs=[(101, 1, 1), (102, 1, 2), (103, 1, 2)])
    lib, _, src, _ = make([parent])
    for f in ("nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetSamples", "nvmlDeviceGetUtilizationRates"):
        for u in ("MIG-1", "MIG-2"):
            lib.fail[(f, u)] = NOT_SUPPORTED
    assert src.devices() == [DeviceInfo("MIG-1", "H100-80G-MIG-3g.40gb"), DeviceInfo("MIG-2", "H100-80G-MIG-1g.10gb")]
    obs = src.observe(10)
    assert [(o.gpu_uuid, o.firm_id, o.util_percent, o.energy_mj_total) for o in obs] == [
        ("MIG-1", "F1", None, None),
        ("MIG-2", "F1", None, None),  # F2 (pid 102) and F1 (pid 103) share it, equal memory: lowest id
    ]
    assert src.shared_samples == 1
    assert lib.calls["nvmlDeviceGetComputeRunningProcesses"] == 1  # read once on the parent


def test_gpu_lost_during_discovery_skips_that_index() -> None:
    lib, nvml, _, _ = make([])
    lib.gpus = [FakeGpu("GPU-a"), FakeGpu("GPU-b")]
    lib.fail[("nvmlDeviceGetUUID", "GPU-a")] = GPU_IS_LOST
    nvml.discover()
    assert list(nvml.devices) == ["GPU-b"]
    with pytest.raises(GpuLost):
        nvml.query("nvmlDeviceGetUUID", lib.gpus[0])


@pytest.mark.parametrize(
    ("name", "total_mib", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", 81559, "H100-80G"),
        ("NVIDIA A100-SXM4-40GB", 40960, "A100-40G"),
        ("NVIDIA A800 80GB PCIe", 81920, "A800-80G"),
        ("NVIDIA L40S", 46068, "L40S-48G"),
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", 9984, "H100-80G-MIG-1g.10gb"),
        ("Some Accelerator", None, "Some-Accelerator"),
    ],
    ids=["h100", "a100-dash", "a800", "l40s-by-memory", "mig", "unknown"],
)
def test_gpu_class_for(name: str, total_mib: int | None, expected: str) -> None:
    assert gpu_class_for(name, None if total_mib is None else total_mib * 2**20) == expected


def test_gpu_class_override_by_name() -> None:
    assert gpu_class_for("NVIDIA H100 80GB HBM3", None, {"NVIDIA H100 80GB HBM3": "H100-SXM"}) == "H100-SXM"


def test_a_hot_added_gpu_is_found_by_rediscovery_that_backs_off_while_nothing_changes() -> None:
    lib, _, src, clock = make([FakeGpu("GPU-a")])
    enumerations = lambda: lib.calls["nvmlDeviceGetCount"]  # noqa: E731
    start = enumerations()
    for waited in (60, 120, 240):  # nothing new: each wait twice the last
        clock.t += waited - 1
        src.observe(int(clock.t))
        assert enumerations() == start
        clock.t += 1
        src.observe(int(clock.t))
        start += 1
        assert enumerations() == start
    lib.gpus.append(FakeGpu("GPU-new", procs=[(102, 1, NO_GI)]))
    clock.t += 480
    obs = src.observe(int(clock.t))
    assert [(o.gpu_uuid, o.firm_id) for o in obs] == [("GPU-a", None), ("GPU-new", "F2")]
    clock.t += 60  # a change: back to the short wait
    src.observe(int(clock.t))
    assert enumerations() == start + 2


def test_a_window_restored_for_a_gpu_not_found_at_start_is_closed_with_its_seconds() -> None:
    """The agent stopped (open window saved) and GPU-b was lost before it started again: the window is
    closed at its end with the seconds it had, the rest of it missed samples - never dropped."""

    class Saved:
        def __init__(self) -> None:
            self.snap: dict[str, Any] | None = None

        def load(self) -> dict[str, Any] | None:
            return self.snap

        def save(self, snapshot: dict[str, Any], sync: bool) -> None:
            self.snap = snapshot

    a, b = FakeGpu("GPU-a"), FakeGpu("GPU-b", procs=[(101, 1, NO_GI)])
    _, _, src, _ = make([a, b])
    saved, sink = Saved(), Collect()
    meter = Agent(src, HostIdentity("P01", "h1"), sink, window_s=60, interval_s=1, checkpoint=saved)
    for t in range(60, 70):
        meter.sample(t)
    meter.stop()
    _, _, src2, _ = make([a])  # GPU-b is gone at start
    again = Agent(src2, HostIdentity("P01", "h1"), sink, window_s=60, interval_s=1, checkpoint=saved)
    for t in range(75, 121):
        again.sample(t)
    (w,) = [w for w in sink.windows if w["gpu_uuid"] == "GPU-b"]
    assert (w["firm_id"], w["window_start"], w["allocated_seconds"], w["samples_missed"]) == ("F1", 60_000, 10, 50)


def test_an_enumeration_that_fails_is_a_missed_sample_not_a_crash() -> None:
    lib, _, src, clock = make([FakeGpu("GPU-a", procs=[(101, 1, NO_GI)])])
    clock.t += 60
    lib.fail[("nvmlDeviceGetCount", "*")] = DRIVER_NOT_LOADED
    assert [o.missed for o in src.observe(int(clock.t))] == [True]
