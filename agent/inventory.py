"""``gpumeter agent inventory``: this host's rows of the fleet registry (gpumeter/fleet.py), as NVML sees them.

Providers paste or merge these rows into the fleet file instead of typing GPU UUIDs. One row per
metered device: a plain GPU, or each instance of a GPU in MIG mode (``parent_uuid`` names the
physical GPU, which gets no row of its own). The class is the one the running agent reports
(``gpu_classes`` in the agent config, else derived from the device name), so the registry and the
usage windows agree. Rows are sorted by ``gpu_uuid``; ``valid_to`` stays empty (still there).

``inventory_rows`` and ``render`` are pure; ``read_devices`` is the one part that talks to NVML.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.nvml import NvmlDevice
from agent.nvml_source import gpu_class_for
from gpumeter.errors import GpumeterError
from gpumeter.files import write_atomic
from gpumeter.fleet import ID, fleet_text
from gpumeter.inputfiles import RowError, timestamp

HOUR_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
EXAMPLE_HOUR = "2026-12-02T03:00:00Z"


class InventoryError(GpumeterError):
    code = "inventory"


def hour_start(now: datetime) -> datetime:
    """The start of the UTC hour holding ``now`` (an aware datetime)."""
    return now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def parse_hour(text: str) -> datetime:
    """An ISO-8601 time with a UTC offset on a whole UTC hour, as aware UTC; ValueError otherwise."""
    try:
        t = timestamp(text, "valid_from")  # what the fleet reader accepts
    except RowError:
        raise ValueError(f"{text.strip()!r} is not an ISO-8601 time with a UTC offset, e.g. {EXAMPLE_HOUR}") from None
    if t.minute or t.second or t.microsecond:
        raise ValueError(
            f"{text.strip()!r} is not on a whole UTC hour: the registry changes only on the hour "
            f"(e.g. {hour_start(t):{HOUR_FORMAT}})"
        )
    return t


def device_class(dev: NvmlDevice, overrides: dict[str, str]) -> str:
    """The rate-card class the agent reports for ``dev`` (as ``NvmlSource`` classes it)."""
    return overrides.get(dev.uuid) or gpu_class_for(dev.name, dev.memory_total_bytes, overrides)


def inventory_rows(devices: Iterable[NvmlDevice], cfg: AgentConfig, valid_from: datetime) -> list[dict[str, str]]:
    """One fleet row per metered device (MIG instances, not their parent), sorted by gpu_uuid.

    InventoryError if a value could not stand in the registry (e.g. a gpu_classes override with a
    space), so a printed inventory always loads."""
    if valid_from.utcoffset() is None:
        raise ValueError("valid_from must be an aware datetime")
    start = valid_from.astimezone(UTC)
    if start != hour_start(start):
        raise ValueError(f"valid_from {start.isoformat()} is not on a whole UTC hour")
    rows = [
        {
            "provider_id": cfg.provider_id,
            "host_id": cfg.host,
            "gpu_uuid": dev.uuid,
            "gpu_class": device_class(dev, cfg.gpu_classes),
            "window_seconds": str(cfg.window_s),
            "valid_from": f"{start:{HOUR_FORMAT}}",
            "valid_to": "",
            "parent_uuid": dev.parent_uuid or "",
        }
        for dev in devices
        if not dev.mig_parent
    ]
    rows.sort(key=lambda r: r["gpu_uuid"])
    for row in rows:
        for name in ("provider_id", "host_id", "gpu_uuid", "gpu_class", "parent_uuid"):
            value = row[name]
            if (value or name != "parent_uuid") and not ID.fullmatch(value):
                what = "" if name in ("provider_id", "host_id") else f" of GPU {row['gpu_uuid']}"
                raise InventoryError(
                    f"{name} {value!r}{what} cannot stand in the fleet registry "
                    "(letters, digits and . _ : -, at most 128)" + _hint(name)
                )
    return rows


def _hint(name: str) -> str:
    return {
        "provider_id": ": set provider_id in the agent config",
        "host_id": ": set host_id in the agent config",
        "gpu_class": ": set its class in [gpu_classes] of the agent config",
    }.get(name, "")


def render(rows: list[dict[str, str]]) -> str:
    """The fleet file text: header line, then one line per row."""
    return fleet_text(rows)


def read_devices(lib: Any = None) -> list[NvmlDevice]:
    """Every device NVML lists on this host (MIG parents included, flagged); InventoryError when
    NVML is unavailable, lists no GPU, or a GPU it counts could not be read (a partial inventory
    would leave a GPU unregistered)."""
    from agent.nvml import Nvml, Unavailable

    nvml_log = logging.getLogger("gpumeter.agent.nvml")
    level = nvml_log.level
    nvml_log.setLevel(logging.CRITICAL)  # a one-shot command: no "re-initialising in 1 s"; the error says why
    try:
        nvml = Nvml(lib=lib, backoff_min_s=0)
        if not nvml.ensure():
            raise InventoryError(
                f"NVML is not available on this host ({nvml.last_error.removeprefix('init failed: ')}): "
                "the inventory lists the GPUs the NVIDIA driver sees"
            )
        try:
            count = nvml.query("nvmlDeviceGetCount")
            devices = list(nvml.devices.values())
        finally:
            with contextlib.suppress(Exception):
                nvml.lib.nvmlShutdown()
    finally:
        nvml_log.setLevel(level)
    physical = [d for d in devices if d.parent_uuid is None]
    counted = 0 if isinstance(count, Unavailable) else int(count)
    if counted > len(physical):
        read = f" ({', '.join(sorted(d.uuid for d in physical))})" if physical else ""
        raise InventoryError(
            f"NVML counts {counted} GPU(s) but {len(physical)} could be read{read}: "
            "a partial inventory would leave a GPU unregistered; fix or reset it, then run this again"
        )
    if all(d.mig_parent for d in devices):
        empty = sorted(d.uuid for d in devices)
        raise InventoryError(
            f"GPU(s) {', '.join(empty)} in MIG mode with no MIG instance: nothing to register"
            if empty
            else "NVML is up but lists no GPU on this host: nothing to register"
        )
    return devices


def write_output(path: Path, text: str) -> None:
    """Replace ``path`` whole (temp file, fsync, rename): a reader never sees half an inventory."""
    try:
        write_atomic(path, text.encode(), sync=True)
    except OSError as exc:
        with contextlib.suppress(OSError):
            path.with_name(path.name + ".tmp").unlink()
        raise InventoryError(f"cannot write {path}: {exc.strerror or exc}") from None
