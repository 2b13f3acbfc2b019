"""The usage checks: which first deliveries a settlement can defend (docs/usage-checks.md).

A window that passed the ingest checks (``schema.WINDOW_CHECKS``: it is well formed and its
signer may say it) is still judged against what it cannot know alone: the fleet registry (is
this GPU this host's, in this class, with this window grid, at this time?), the other records
of the same GPU and window (together at most the window's length), the firms billing has
loaded, and the usage horizon. A record that breaks one is **held** with the first reason
below: never billed, never in the way of good records, until staff release or exclude it or
fix what it failed (docs/usage-checks.md, "The hold lifecycle").

Pure: the SQL as text and its parameters. ``usage_store`` places it in its one pass: the
registry columns per delivery (``registry_columns``), then the window over one GPU's window,
where ``HOLD_SQL`` can see what every record of that window claims.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from gpumeter.fleet import FleetDevice
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

# a hold in SQL is its position here (``hold_name`` maps it back): numbers, not strings, per row of the pass
HOLD_CODES = ("", *HOLD_REASONS)
# what settlements recorded of a record, as SQL ``hold_state`` (``bitAnd(marks, 7)``): 0 nothing
HOLD_STATES = {0: "", MARK_BITS["held"]: "held", MARK_BITS["excluded"]: "excluded", MARK_BITS["billed"]: "billed"}
HELD = MARK_BITS["held"]


def _code(name: str) -> int:
    return HOLD_CODES.index(name)


# per delivery, over the raw columns and ``marks``: where the registry puts this GPU at the window's
# start. Only lookups in the LowCardinality dictionary of gpu_uuid (evaluated once per distinct GPU,
# then indexed per row) and arithmetic: measured at 20M windows, a lookup by registry position per row
# and an if() that picks one of two made the checked pass 16 s against 8 s.
INT64_MAX = 2**63 - 1


def _period(name: str, k: int, ch_type: str, default: int = 0) -> str:
    """Column ``name`` of the k-th registry period (oldest first) of the delivery's GPU."""
    return f"transform(gpu_uuid, {{reg_gpus:Array(String)}}, {{p{k}_{name}:Array({ch_type})}}, to{ch_type}({default}))"


def registry_columns(periods: int) -> str:
    """The registry columns, for a registry whose GPUs have at most ``periods`` periods each. A GPU's
    period at ``ws_ms`` is the number of its later periods that have begun (periods never overlap;
    a GPU with fewer has INT64_MAX as the start of the ones it lacks)."""

    def pick(name: str, ch_type: str, default: int = 0) -> str:
        if periods == 1:
            return _period(name, 0, ch_type, default)
        arms = ", ".join(f"rk = {k}, {_period(name, k, ch_type, default)}" for k in range(periods - 1))
        return f"multiIf({arms}, {_period(name, periods - 1, ch_type, default)})"

    begun = " + ".join(f"(ws_ms >= {_period('from', k, 'Int64', INT64_MAX)})" for k in range(1, periods)) or "0"
    return f"""
    toUnixTimestamp64Milli(window_start) AS ws_ms, toUnixTimestamp64Milli(window_end) AS we_ms,
    toUInt8({begun}) AS rk,
    ws_ms >= {pick("from", "Int64", INT64_MAX)} AND we_ms <= {pick("to", "Int64")} AS registered,
    {pick("hp", "UInt64")} AS reg_hp,
    {pick("cw", "UInt64")} AS reg_cw,
    toInt64(bitAnd(reg_cw, 4294967295)) * 1000 AS reg_window_ms,
    bitTest(marks, 3) AS excluded,
    bitTest(marks, 4) AS released,
    toUInt8(multiIf(
        NOT registered, {_code("unregistered")},
        transform(host_id, {{hosts:Array(String)}}, {{host_nos:Array(UInt64)}}, toUInt64(0))
            != bitShiftRight(reg_hp, 32), {_code("other_host")},
        transform(provider_id, {{providers:Array(String)}}, {{provider_nos:Array(UInt64)}}, toUInt64(0))
            != bitAnd(reg_hp, 4294967295), {_code("other_provider")},
        we_ms - ws_ms != reg_window_ms, {_code("window_length")},
        ws_ms % greatest(reg_window_ms, 1) != 0, {_code("misaligned")},
        0)) AS registry_code,
    if(registered, toUInt32(bitShiftRight(reg_cw, 32)), toUInt32(0)) AS class_no,
    transform(firm_id, {{firms:Array(String)}}, {{firm_known:Array(UInt8)}}, toUInt8(0)) = 1 AS firm_known,
    we_ms - ws_ms AS window_ms"""


# after the window, on first deliveries: the class that prices the record (a string, for the group keys)
JUDGED_COLUMNS = """
    if(class_no = 0, toString(gpu_class),
       transform(class_no, {class_nos:Array(UInt32)}, {classes:Array(String)}, '')) AS registered_class"""
# what a delivery claims of its GPU's window: its seconds, if it passes the registry (or was released,
# and its GPU is registered at the window's time: a release never stands in for the registry's class),
# was not excluded and arrived by the cutoff
CLAIM_SQL = f"""if((registry_code = 0 OR released AND registry_code != {_code("unregistered")}) AND NOT excluded
       AND ingested_at <= {{checks_cutoff:DateTime64(6, 'UTC')}}, toInt64(allocated_seconds), toInt64(0))"""

# what the deliveries of one GPU's window claim, over the window of the pass (every delivery of the
# GPU's window, each record's together): the sum of the distinct (record, claim) pairs, as the low
# 64 bits of a sum of distinct (hash(record_id) << 64 | claim). A record delivered again with the same
# content claims once (a copy that arrived after the cutoff claims 0, which adds nothing); one
# delivered with different allocated seconds claims each of them (docs/usage-checks.md). A scalar per
# row: an array of the window's claims per row cost 30 s at 100M windows.
CLAIMED_SQL = "sumDistinct(bitOr(bitShiftLeft(toUInt128(rid_hash), 64), toUInt128(claim)))"
OCCUPIED_SQL = "toInt64(bitAnd(claimed, toUInt128(18446744073709551615)))"
# the hold of a first delivery, as its position in HOLD_CODES (0: it bills)
HOLD_SQL = f"""toUInt8(multiIf(
        excluded, {_code("excluded")},
        firm_id = '{UNATTRIBUTED}', 0,
        registry_code != 0 AND (NOT released OR registry_code = {_code("unregistered")}), registry_code,
        occupied * 1000 > window_ms, {_code("oversubscribed")},
        window_start < {{oldest:DateTime64(3, 'UTC')}} AND NOT released, {_code("too_old")},
        NOT firm_known, {_code("unknown_firm")},
        0))"""


@dataclass(frozen=True, slots=True)
class Checks:
    """What one reading judges usage against."""

    devices: tuple[FleetDevice, ...]  # the registry version in force (empty: none loaded, no GPU known)
    firms: tuple[str, ...]  # the firms billing has loaded
    cutoff: datetime  # decisions and other records' claims as of this instant
    store_id: str  # the billing store whose decisions apply
    oldest: datetime  # usage dated before this is held (the settled month's start minus the horizon)

    @property
    def periods(self) -> int:
        """The most registry periods any one GPU has (at least 1)."""
        counts: dict[str, int] = {}
        for d in self.devices:
            counts[d.gpu_uuid] = counts.get(d.gpu_uuid, 0) + 1
        return max(counts.values(), default=1)

    def params(self) -> dict[str, Any]:
        by_gpu: dict[str, list[FleetDevice]] = {}
        for d in sorted(self.devices, key=lambda d: (d.gpu_uuid, d.valid_from)):
            by_gpu.setdefault(d.gpu_uuid, []).append(d)
        hosts = sorted({d.host_id for d in self.devices})
        providers = sorted({d.provider_id for d in self.devices})
        classes = sorted({d.gpu_class for d in self.devices})
        host_no = {h: i for i, h in enumerate(hosts, start=1)}
        provider_no = {p: i for i, p in enumerate(providers, start=1)}
        class_no = {c: i for i, c in enumerate(classes, start=1)}
        out: dict[str, Any] = {"reg_gpus": list(by_gpu) or [""]}  # a GPU id is never empty: '' matches nothing
        # the k-th period of each GPU: its hours, and packed (host << 32 | provider), (class << 32 | window)
        for k in range(self.periods):
            nth = [rows[k] if k < len(rows) else None for rows in by_gpu.values()]
            out[f"p{k}_from"] = [epoch_ms(d.valid_from) if d else INT64_MAX for d in nth] or [INT64_MAX]
            out[f"p{k}_to"] = [epoch_ms(d.valid_to) if d else 0 for d in nth] or [0]
            out[f"p{k}_hp"] = [(host_no[d.host_id] << 32 | provider_no[d.provider_id]) if d else 0 for d in nth] or [0]
            out[f"p{k}_cw"] = [(class_no[d.gpu_class] << 32 | d.window_seconds) if d else 0 for d in nth] or [0]
        return {
            **out,
            "hosts": hosts or [""],
            "host_nos": list(host_no.values()) or [0],
            "providers": providers or [""],
            "provider_nos": list(provider_no.values()) or [0],
            "classes": classes or [""],
            "class_nos": list(class_no.values()) or [0],
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


def hold_name(code: int) -> str:
    """The hold code of SQL ``hold`` (its position in HOLD_CODES); '' for a record that bills."""
    return HOLD_CODES[code]


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
