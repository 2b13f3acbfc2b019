"""``DeviceSource`` over NVML: readings in, observations (who holds each GPU) out.

No pynvml here: ``agent.nvml`` owns every call. Holder rule per sample: the
firms of the GPU's running compute processes, each resolved by the attribution
chain (unresolved -> ``unattributed``); no process -> idle. If several firms share
one GPU at one instant, the one using the most GPU memory holds it for that
sample (ties: lowest firm id) and ``shared_samples`` counts it, so a GPU-second
is never billed twice. The driver's utilisation is the GPU's, all firms' use
together: for an interval shared at either end it is not the holder's. There the
holder's utilisation is its own processes' use, from the driver's per-process
figures over the same interval (``nvmlDeviceGetProcessUtilization``), when the
holder ran the same processes at both ends of the interval (a process that came
or went inside it would be averaged over a span we cannot tell); otherwise, or
where the driver has no per-process figures (MIG, older GPUs), it is unknown
(``None``): never another firm's use credited to the holder. A device that cannot be read (GPU lost, NVML down,
processes unavailable) gives a *missed* sample: nobody is billed for it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping

from agent.devices import DeviceInfo, Observation
from agent.nvml import GpuLost, GpuProcess, Nvml, NvmlDevice, NvmlDown, Reading, Unavailable

log = logging.getLogger("gpumeter.agent.nvml")

REDISCOVER_MAX_S = 900.0  # the longest wait between enumerations while nothing changes
MODEL = re.compile(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b")
NAME_GB = re.compile(r"(\d{2,3})\s?GB\b", re.IGNORECASE)
MIG_PROFILE = re.compile(r"\bMIG\s+(\d+g\.\d+gb)\b", re.IGNORECASE)
NOMINAL_GB = (16, 24, 32, 40, 48, 64, 80, 94, 96, 141, 144, 180, 192)


def gpu_class_for(name: str, memory_total_bytes: int | None, overrides: Mapping[str, str] = {}) -> str:
    """Rate-card class from the device name, e.g. 'NVIDIA H100 80GB HBM3' -> 'H100-80G'."""
    if name in overrides:
        return overrides[name]
    model = MODEL.search(name.replace("NVIDIA", ""))
    if model is None:
        return re.sub(r"[^A-Za-z0-9.-]+", "-", name).strip("-") or "unknown"
    gb_in_name = NAME_GB.search(name)
    if gb_in_name:
        gb = int(gb_in_name.group(1))
    elif memory_total_bytes:
        gib = memory_total_bytes / 2**30
        gb = min(NOMINAL_GB, key=lambda n: (abs(n - gib), n))
    else:
        return model.group(1)
    mig = MIG_PROFILE.search(name)
    return f"{model.group(1)}-{gb}G" + (f"-MIG-{mig.group(1)}" if mig else "")


def holder(procs: tuple[GpuProcess, ...], firm_of: Callable[[int], str]) -> tuple[str | None, bool]:
    """(firm holding the GPU, whether several firms shared it) for one sample."""
    if not procs:
        return None, False
    memory: dict[str, int] = {}
    for p in procs:
        firm = firm_of(p.pid)
        memory[firm] = memory.get(firm, 0) + (p.used_memory_bytes or 0)
    best = min(memory, key=lambda f: (-memory[f], f))
    return best, len(memory) > 1


class NvmlSource:
    def __init__(
        self,
        nvml: Nvml,
        resolve: Callable[[int, str], str],
        interval_s: int,
        gpu_classes: Mapping[str, str] | None = None,
        rediscover_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nvml = nvml
        self.resolve = resolve
        self.interval_s = interval_s
        self.gpu_classes = dict(gpu_classes or {})
        self.rediscover_s = rediscover_s
        self.clock = clock
        self._infos: dict[str, DeviceInfo] = {}
        self._generation: dict[str, int] = {}
        self._last_discovery = clock()
        self._rediscover_every = rediscover_s  # while no device is failed; doubles while nothing changes
        self.samples_missed = 0
        self.shared_samples = 0
        self._shared: set[str] = set()  # GPUs several firms shared at the previous sample
        self._held: dict[str, tuple[str, frozenset[int]]] = {}  # GPU -> (holder, its pids) at the previous sample
        self.nvml.ensure()
        self._refresh_infos()

    def devices(self) -> list[DeviceInfo]:
        """Every device seen since start (a lost one stays, its samples count as missed); one that
        appears later (hot-added, or unreadable at start) is found by the periodic rediscovery."""
        return list(self._infos.values())

    def observe(self, now_s: int) -> list[Observation]:
        readings = []
        if self.nvml.ensure():
            try:
                self._maybe_rediscover()
                readings = self.nvml.read(now_s * 1_000_000, self.interval_s * 1_000_000)
            except NvmlDown as exc:
                self.nvml.mark_down(str(exc))
                readings = []
            except GpuLost as exc:  # enumeration met a lost GPU: this tick is missed, the next retries
                log.error("device enumeration failed (%s): this sample is missed", exc)
                readings = []
        self._refresh_infos()
        seen = {r.uuid: r for r in readings}
        out = []
        for uuid in self._infos:
            r = seen.get(uuid)
            began_shared = uuid in self._shared  # the interval this reading measures
            self._shared.discard(uuid)
            held = self._held.pop(uuid, None)  # the interval's holder and its processes
            if r is None or r.failed or isinstance(r.processes, Unavailable):
                self.samples_missed += 1
                out.append(Observation(uuid, None, None, None, missed=True))
                continue
            firms = {p.pid: self.resolve(p.pid, uuid) for p in r.processes}
            firm, shared = holder(r.processes, firms.__getitem__)
            self.shared_samples += shared
            if shared:
                self._shared.add(uuid)
            if firm is not None:
                self._held[uuid] = (firm, frozenset(pid for pid, f in firms.items() if f == firm))
            # shared at either end of the interval: another firm's process may have run in it
            util = _own_use(r, held, firms) if began_shared or shared else _num(r.util_percent)
            # for whom: the holder this source saw at the interval's start ("" none: after a restart, the
            # integrator's restored holder is not credited an interval whose start nobody saw)
            energy = self._energy(uuid, r.energy_mj_total)
            out.append(Observation(uuid, firm, util, energy, util_for=held[0] if held else ""))
        return out

    def _energy(self, uuid: str, value: int | Unavailable) -> int | None:
        """The counter, except on the first reading after a (re)init: it restarted from zero."""
        generation, self._generation[uuid] = self._generation.get(uuid), self.nvml.generation
        if isinstance(value, Unavailable) or (generation is not None and generation != self.nvml.generation):
            return None
        return value

    def _maybe_rediscover(self) -> None:
        """Enumerate the devices again: every ``rediscover_s`` while one is failed (a lost GPU that
        comes back), otherwise with backoff up to ``REDISCOVER_MAX_S`` while nothing changes (a GPU
        hot-added, or one that could not be read at start)."""
        failed = any(d.failed for d in self.nvml.devices.values())
        wait = self.rediscover_s if failed else self._rediscover_every
        if self.clock() - self._last_discovery < wait:
            return
        before = set(self.nvml.devices)
        self._last_discovery = self.clock()
        self.nvml.discover()
        if failed or set(self.nvml.devices) != before:
            self._rediscover_every = self.rediscover_s
        else:
            self._rediscover_every = min(self._rediscover_every * 2, REDISCOVER_MAX_S)

    def _refresh_infos(self) -> None:
        for dev in self.nvml.devices.values():
            if not dev.mig_parent and dev.uuid not in self._infos:
                self._infos[dev.uuid] = DeviceInfo(dev.uuid, self._class(dev))

    def _class(self, dev: NvmlDevice) -> str:
        return self.gpu_classes.get(dev.uuid) or gpu_class_for(dev.name, dev.memory_total_bytes, self.gpu_classes)


def _own_use(r: Reading, held: tuple[str, frozenset[int]] | None, firms: Mapping[int, str]) -> float | None:
    """The utilisation of an interval several firms shared, that its holder's own processes made:
    the sum of their per-process figures, at most the GPU's; ``None`` when the driver has no such
    figures, the holder's processes differ between the interval's two ends, or "no process used
    the GPU" is not confirmed by the GPU's own figure. A holder's process the driver does not list
    counts 0 (NVML lists only processes that used the GPU in the interval)."""
    if held is None or not isinstance(r.process_util, dict):
        return None
    firm, pids = held
    if frozenset(pid for pid, f in firms.items() if f == firm) != pids:
        return None
    gpu = _num(r.util_percent)
    if not r.process_util and (gpu is None or gpu > 0):  # "none used it": only evidence if the GPU agrees
        return None
    own = float(min(100, sum(r.process_util.get(pid, 0) for pid in pids)))
    return own if gpu is None else min(own, gpu)


def _num(value: float | Unavailable) -> float | None:
    return None if isinstance(value, Unavailable) else value
