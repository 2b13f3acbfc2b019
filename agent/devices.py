"""The seam between where GPU facts come from and what the agent does with them.

A ``DeviceSource`` answers, at a sampling instant, who holds each GPU and how busy
it is. The simulated fleet (``agent.simulate``) implements it for tests and the
demo; the NVML source implements it on GPU hosts. Nothing past this seam knows
which one it is talking to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    gpu_uuid: str
    gpu_class: str


@dataclass(frozen=True, slots=True)
class Observation:
    """One GPU at one sampling instant. ``None`` means unavailable, never zero."""

    gpu_uuid: str
    firm_id: str | None  # None: nobody holds the GPU (idle)
    util_percent: float | None  # mean utilisation over the interval since the previous sample (as NVML measures)
    energy_mj_total: int | None  # the device's cumulative energy counter (mJ since driver load)
    missed: bool = False  # the device could not be read at all: nobody is billed for this sample
    # the firm whose use ``util_percent`` is, as the source saw the interval's start ("" nobody, "*" not
    # said): the integrator credits it only to that firm, so a sample it refused cannot misdirect it
    util_for: str = "*"


class DeviceSource(Protocol):
    def devices(self) -> list[DeviceInfo]:
        """Every device this source has seen; it may grow (a device appears, MIG is reconfigured)."""
        ...

    def observe(self, now_s: int) -> list[Observation]: ...
