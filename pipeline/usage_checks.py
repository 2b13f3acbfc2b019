"""The usage checks: which first deliveries a settlement can defend (docs/usage-checks.md).

A window that passed the ingest checks (``schema.WINDOW_CHECKS``: it is well formed and its
signer may say it) is still judged against what it cannot know alone: the fleet registry (is
this GPU this host's, in this class, with this window grid, at this time?), the other records
of the same GPU and window (together at most the window's length), the firms billing has
loaded, and the usage horizon. A record that breaks one is **held** with the first reason
below: never billed, never in the way of good records, until staff release or exclude it or
fix what it failed (docs/usage-checks.md, "The hold lifecycle").

Pure: the SQL as text and its parameters. ``usage_store`` places it in its one pass: the
registry columns per delivery (``REGISTRY_COLUMNS``), then the window over one GPU's window,
where ``HOLD_SQL`` can see what every record of that window claims.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from gpumeter.fleet import MAX_PERIODS, FleetDevice
from gpumeter.record import UNATTRIBUTED

# code -> what staff read; the order is the order of the checks (the first that fails names the hold)
HOLD_REASONS: dict[str, str] = {
    "excluded": "excluded by staff",
    "unregistered": "GPU not in the fleet registry at the window's time",
    "other_host": "GPU registered to another host at the window's time",
    "other_provider": "host registered to another provider",
    "window_length": "window length is not the host's registered window_seconds",
    "misaligned": "window_start is not on the host's window grid",
    "oversubscribed": "the GPU's window holds more allocated seconds than its length",
    "too_old": "dated before the usage horizon of the settled month",
    "unknown_firm": "firm not loaded in billing",
}

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# what settlements and staff recorded of a record, as bits of ``marks`` (``mark_bits``): its latest hold
# row says held (0), excluded (1) or billed (2); its latest decision is exclude (3) or release (4)
MARK_BITS = {"held": 1, "excluded": 2, "billed": 4, "exclude": 8, "release": 16}

# per delivery, over the raw columns and ``marks``: where the registry puts this GPU at the window's
# start. Numbers only (ids mapped to registry positions through the LowCardinality dictionaries), so
# the window that follows carries no strings of its own; ``JUDGED_COLUMNS`` names them afterwards.
REGISTRY_HOLDS = ("", "unregistered", "other_host", "other_provider", "window_length", "misaligned")


def _attribute(name: str, ch_type: str) -> str:
    """A registry column of the record's period: for a GPU with one period (nearly all), a lookup
    in the LowCardinality dictionary of gpu_uuid; otherwise by the period's position (slower: it is
    evaluated only for those rows, short_circuit_function_evaluation = 'force_enable')."""
    return (
        f"if(rc = 1, transform(gpu_uuid, {{reg_gpus:Array(String)}}, {{one_{name}:Array({ch_type})}}, to{ch_type}(0)), "
        f"transform(ri, {{reg_no:Array(UInt32)}}, {{reg_{name}:Array({ch_type})}}, to{ch_type}(0)))"
    )


REGISTRY_COLUMNS = """
    toUnixTimestamp64Milli(window_start) AS ws_ms, toUnixTimestamp64Milli(window_end) AS we_ms,
    transform(gpu_uuid, {reg_gpus:Array(String)}, {reg_first:Array(UInt32)}, toUInt32(0)) AS rf,
    transform(gpu_uuid, {reg_gpus:Array(String)}, {reg_count:Array(UInt32)}, toUInt32(0)) AS rc,
    if(rc <= 1, rf, {period}) AS ri,
    rf > 0 AND ws_ms >= <from> AND we_ms <= <to> AS registered,
    toInt64(<window>) * 1000 AS reg_window_ms,
    bitTest(marks, 3) AS excluded,
    bitTest(marks, 4) AS released,
    multiIf(
        NOT registered, 1,
        transform(host_id, {hosts:Array(String)}, {host_nos:Array(UInt32)}, toUInt32(0)) != <host>, 2,
        transform(provider_id, {providers:Array(String)}, {provider_nos:Array(UInt32)}, toUInt32(0)) != <provider>, 3,
        we_ms - ws_ms != reg_window_ms, 4,
        ws_ms % reg_window_ms != 0, 5,
        0) AS registry_code,
    if(registered, <cls>, toUInt32(0)) AS class_no,
    transform(firm_id, {firms:Array(String)}, {firm_known:Array(UInt8)}, toUInt8(0)) = 1 AS firm_known,
    if(registry_code = 0, reg_window_ms, we_ms - ws_ms) AS window_ms"""
_ATTRIBUTES = (
    ("<from>", "from", "Int64"), ("<to>", "to", "Int64"), ("<window>", "window", "UInt32"),
    ("<host>", "host", "UInt32"), ("<provider>", "provider", "UInt32"), ("<cls>", "class", "UInt32"),
)  # fmt: skip
for _name, _column, _type in _ATTRIBUTES:
    REGISTRY_COLUMNS = REGISTRY_COLUMNS.replace(_name, _attribute(_column, _type))
# a GPU's periods are consecutive in the registry arrays, oldest first: its period at ``ws_ms`` is the
# first one plus the number of later ones that have begun
PERIOD_SQL = (
    "toUInt32(rf + "
    + " + ".join(
        f"(rc > {k} AND ws_ms >= transform(toUInt32(rf + {k}), {{reg_no:Array(UInt32)}}, {{reg_from:Array(Int64)}}, "
        "toInt64(0)))"
        for k in range(1, MAX_PERIODS)
    )
    + ")"
)
REGISTRY_COLUMNS = REGISTRY_COLUMNS.replace("{period}", PERIOD_SQL)
# after the window, on first deliveries: the names
# (comparisons and hash lookups: an element of a constant array read per row copies the array into every block)
JUDGED_COLUMNS = f"""
    multiIf({", ".join(f"registry_code = {i}, '{c}'" for i, c in enumerate(REGISTRY_HOLDS) if i)}, '') AS registry_hold,
    if(class_no = 0, toString(gpu_class),
       transform(class_no, {{class_nos:Array(UInt32)}}, {{classes:Array(String)}}, '')) AS registered_class,
    multiIf(bitTest(marks, 0), 'held', bitTest(marks, 1), 'excluded', bitTest(marks, 2), 'billed', '') AS hold_state"""
# what a delivery claims of its GPU's window: its seconds, if it passes the registry (or was released),
# was not excluded and arrived by the cutoff
CLAIM_SQL = """if((registry_code = 0 OR released) AND NOT excluded
       AND ingested_at <= {checks_cutoff:DateTime64(6, 'UTC')}, toInt64(allocated_seconds), toInt64(0))"""

# per first delivery, once the window over its GPU's window has gathered ``claims`` (hash of
# record_id, claim) in the table's order: a record's first element is its first delivery, whose
# claim counts once (one delivery in the window, the usual case, is read without the arrays)
OCCUPIED_SQL = (
    "if(length(claims) = 1, claims[1].2, arraySum(arrayMap((c, prev) -> if(c.1 != prev, c.2, 0), claims, "
    "arrayPushFront(arrayPopBack(arrayMap(c -> c.1, claims)), toUInt64(0)))))"
)
HOLD_SQL = f"""multiIf(
        excluded, 'excluded',
        firm_id = '{UNATTRIBUTED}', '',
        registry_hold != '' AND NOT released, registry_hold,
        occupied * 1000 > window_ms, 'oversubscribed',
        window_start < {{oldest:DateTime64(3, 'UTC')}} AND NOT released, 'too_old',
        NOT firm_known, 'unknown_firm',
        '')"""


@dataclass(frozen=True, slots=True)
class Checks:
    """What one reading judges usage against."""

    devices: tuple[FleetDevice, ...]  # the registry version in force (empty: none loaded, no GPU known)
    firms: tuple[str, ...]  # the firms billing has loaded
    cutoff: datetime  # decisions and other records' claims as of this instant
    store_id: str  # the billing store whose decisions apply
    oldest: datetime  # usage dated before this is held (the settled month's start minus the horizon)

    def params(self) -> dict[str, Any]:
        rows = sorted(self.devices, key=lambda d: (d.gpu_uuid, d.valid_from))
        gpus: list[str] = []
        first: list[int] = []
        count: list[int] = []
        for i, d in enumerate(rows, start=1):
            if not gpus or gpus[-1] != d.gpu_uuid:
                gpus.append(d.gpu_uuid)
                first.append(i)
                count.append(0)
            count[-1] += 1
        hosts = sorted({d.host_id for d in rows})
        providers = sorted({d.provider_id for d in rows})
        classes = sorted({d.gpu_class for d in rows})
        return {
            "reg_gpus": gpus or [""],  # a GPU id is never empty: '' matches nothing real
            "reg_first": first or [0],
            "reg_count": count or [0],
            "reg_no": list(range(1, len(rows) + 1)) or [0],  # lookups by position go through transform:
            # an element of a constant array, read per row, copies the whole array into every block
            "reg_from": [epoch_ms(d.valid_from) for d in rows] or [0],
            "reg_to": [epoch_ms(d.valid_to) for d in rows] or [0],
            "hosts": hosts or [""],
            "host_nos": list(range(1, len(hosts) + 1)) or [0],
            "providers": providers or [""],
            "provider_nos": list(range(1, len(providers) + 1)) or [0],
            "classes": classes or [""],
            "class_nos": list(range(1, len(classes) + 1)) or [0],
            "reg_host": [hosts.index(d.host_id) + 1 for d in rows] or [0],
            "reg_provider": [providers.index(d.provider_id) + 1 for d in rows] or [0],
            "reg_class": [classes.index(d.gpu_class) + 1 for d in rows] or [0],
            "reg_window": [d.window_seconds for d in rows] or [0],
            **{
                f"one_{k}": [v[i - 1] for i in first] or [0]
                for k, v in (
                    ("from", [epoch_ms(d.valid_from) for d in rows]),
                    ("to", [epoch_ms(d.valid_to) for d in rows]),
                    ("window", [d.window_seconds for d in rows]),
                    ("host", [hosts.index(d.host_id) + 1 for d in rows]),
                    ("provider", [providers.index(d.provider_id) + 1 for d in rows]),
                    ("class", [classes.index(d.gpu_class) + 1 for d in rows]),
                )
            },  # the first (for most GPUs the only) period of each GPU in reg_gpus
            "firms": sorted(self.firms) or [""],
            "firm_known": [1] * len(self.firms) or [0],
            "checks_cutoff": self.cutoff.astimezone(UTC).replace(tzinfo=None),
            "store_id": self.store_id,
            "oldest": self.oldest.astimezone(UTC).replace(tzinfo=None),
        }


def epoch_ms(t: datetime) -> int:
    """Epoch milliseconds of an aware datetime, exactly."""
    return (t - EPOCH) // timedelta(milliseconds=1)


def state_only(cutoff: datetime | None, store_id: str) -> Checks:
    """Checks for a read that uses only ``hold_state`` (what settlements recorded), no registry."""
    return Checks((), (), cutoff or datetime.now(UTC), store_id, EPOCH)


def reason_text(code: str) -> str:
    return HOLD_REASONS.get(code, code)


def codes(values: Iterable[str]) -> list[str]:
    """The hold codes among ``values``, refusing an unknown one (for command-line filters)."""
    out = []
    for v in values:
        if v not in HOLD_REASONS:
            raise ValueError(f"unknown hold reason {v!r}; one of {', '.join(HOLD_REASONS)}")
        out.append(v)
    return out
