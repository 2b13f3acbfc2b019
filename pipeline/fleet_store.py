"""The fleet registry in ClickHouse: load a checked fleet file as a new version, read the current one.

The registry is what each provider really has (``gpumeter.fleet``); settlement reads the current
version to decide which usage it can defend (docs/usage-checks.md). Every version stays, so what
was registered when can always be shown.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gpumeter.fleet import FleetDevice, fleet_digest

DEVICE_COLUMNS = (
    "version", "line", "provider_id", "host_id", "gpu_uuid", "gpu_class", "window_seconds", "valid_from",
    "valid_to", "parent_uuid",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class FleetVersion:
    version: int
    digest: str
    source: str
    devices: int
    loaded_at: datetime


@dataclass(frozen=True, slots=True)
class LoadResult:
    version: FleetVersion
    changed: bool  # False: the file's content is the current version's, nothing written


def current_version(client: Any, db: str) -> FleetVersion | None:
    rows = client.query(
        f"SELECT version, digest, source, devices, loaded_at FROM {db}.fleet_versions ORDER BY version DESC LIMIT 1"
    ).result_rows
    if not rows:
        return None
    v, digest, source, devices, loaded_at = rows[0]
    return FleetVersion(int(v), str(digest), str(source), int(devices), loaded_at.replace(tzinfo=UTC))


def load_fleet(client: Any, db: str, devices: Sequence[FleetDevice], source: str) -> LoadResult:
    """Make ``devices`` (a whole checked file) the current registry; the same content again is a no-op."""
    digest = fleet_digest(list(devices))
    current = current_version(client, db)
    if current is not None and current.digest == digest:
        return LoadResult(current, False)
    used = client.query(
        f"SELECT greatest((SELECT max(version) FROM {db}.fleet_versions), "
        f"(SELECT max(version) FROM {db}.fleet_devices))"
    ).result_rows[0][0]
    version = int(used or 0) + 1
    rows = [
        (version, d.line, d.provider_id, d.host_id, d.gpu_uuid, d.gpu_class, d.window_seconds, d.valid_from,
         d.valid_to, d.parent_uuid)
        for d in devices
    ]  # fmt: skip
    client.insert(f"{db}.fleet_devices", rows, column_names=DEVICE_COLUMNS)
    loaded = FleetVersion(version, digest, source, len(rows), datetime.now(UTC))
    client.insert(
        f"{db}.fleet_versions",
        [(version, digest, source, len(rows), loaded.loaded_at)],
        column_names=("version", "digest", "source", "devices", "loaded_at"),
    )
    return LoadResult(loaded, True)


def devices(client: Any, db: str, version: int) -> list[FleetDevice]:
    """The devices of one loaded version, in (gpu_uuid, valid_from) order."""
    result = client.query(
        f"SELECT line, provider_id, host_id, gpu_uuid, gpu_class, window_seconds, valid_from, valid_to, parent_uuid "
        f"FROM {db}.fleet_devices WHERE version = {{v:UInt32}} ORDER BY gpu_uuid, valid_from",
        parameters={"v": version},
    )
    return [
        FleetDevice(int(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), int(r[5]), r[6].replace(tzinfo=UTC),
                    r[7].replace(tzinfo=UTC), str(r[8]))
        for r in result.result_rows
    ]  # fmt: skip
