"""The ClickHouse DDL as text, and the window checks as SQL. Pure: strings in, strings out.

Generated, not hand-written, so the unit tests can read every statement, on a
single server and ON CLUSTER with Replicated engines (``cluster=``).

Window checks (plausibility, the record id, the signer's host and provider) run
inside ClickHouse, in the materialized views that take each ``usage_ingest_v<N>``
block apart: the loader never decodes a window in Python. ``WINDOW_CHECKS`` is
the single list of rules; the first that matches names the quarantine reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from gpumeter.record import FIRM_ID_PATTERN, MAX_WINDOWS_PER_BATCH, UNATTRIBUTED
from pipeline.framing import ADDED_PREFIX_FIELDS, PREFIX_FIELDS, WriterVersion

# Changes with the views' text other than the checks (the checks are in the view names already):
# a database made with older views gets these beside them, then the old ones are dropped.
# 2: rejections carry the loader's block (block_id); 3: the batch's window count joined; 4: messages
# made outside their signing key's validity do not count
VIEWS_REVISION = 4
DEDUP_WINDOW = 10_000  # insert blocks remembered per table for insert_deduplication_token
FUTURE_TOLERANCE_S = 300  # a window may end at most this long after the loader's clock (never the producer's)
EARLIEST_WINDOW_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
# no window is longer than a day: every later product stays far inside Int64, and allocated_seconds
# (at most the window's length) inside usage_raw's UInt32
MAX_WINDOW_MS = 86_400_000

# Highest power one GPU of a class can draw, in watts (board limit with headroom). A window's
# energy_joules above watts * window length is impossible and quarantined.
MAX_WATTS_BY_CLASS: dict[str, int] = {
    "A100-40G": 450,
    "A100-80G": 450,
    "A800-80G": 450,
    "Ascend-910B": 450,
    "B200": 1_200,
    "H100-80G": 800,
    "H20": 450,
    "H200": 800,
    "H800": 800,
    "L20": 320,
    "L40S-48G": 400,
    "RTX-4090": 500,
}
DEFAULT_MAX_WATTS = 1_500  # an unknown class: more than any single accelerator sold today

# (reason, SQL condition over the ARRAY JOINed window `w` and the batch columns); first match wins.
# Checks of a whole Kafka batch, before its windows' (not for imported rows, which have no batch). The
# loader counts a message's windows before it inserts (loader.py); this sees every Avro array block.
# ``n_windows`` is joined beside each window (INGEST_JOIN): naming ``b.windows`` after the ARRAY JOIN
# would copy the whole array into every window's row.
SIGNER_HOST_REASON = "batch host_id is not the signing key's host"  # the loader checks it first (a heartbeat too)
BATCH_CHECKS: tuple[tuple[str, str], ...] = (
    (f"batch of more than {MAX_WINDOWS_PER_BATCH} windows", f"n_windows > {MAX_WINDOWS_PER_BATCH}"),
)

# The signing key's validity (the ingest prefix's gm_key_from_ms / gm_key_until_ms, -1 = no bound),
# against when the agent made the batch (``made_at``, v3 on; signed with the rest of it) and when it
# arrived (the loader's clock, never the sender's). The sender chooses made_at, so a key with a
# ``valid_until`` also cannot make a batch look older than the windows it carries, nor be used past
# MAX_BACKLOG after its end (a backlog older than that needs `pipeline requeue`, reviewed); a key
# whose validity has not begun by the loader's clock verifies nothing. A batch of an older writer
# has no made_at: none of its windows may end after the key's validity ended.
MAX_BACKLOG_S = 30 * 86_400  # how long after its end a retired key's backlog is still taken
KEY_FROM_REASON = "batch made before its signing key's validity began"
KEY_UNTIL_REASON = "batch made after its signing key's validity ended"
KEY_LATE_REASON = f"window ends more than {FUTURE_TOLERANCE_S} s after its batch was made"
KEY_UNTIL_OLD_REASON = "window ends after its signing key's validity ended"
KEY_NOT_YET_REASON = "signing key not valid yet by the loader's clock"
KEY_BACKLOG_REASON = f"batch arrived more than {MAX_BACKLOG_S // 86_400} days after its signing key's validity ended"
MADE_FUTURE_REASON = f"batch made more than {FUTURE_TOLERANCE_S} s after the loader's clock"
_NOW_MS = "intDiv(b.gm_ingested_at_us, 1000)"
ARRIVAL_CHECKS = (
    (KEY_NOT_YET_REASON, f"b.gm_key_from_ms >= 0 AND {_NOW_MS} + {FUTURE_TOLERANCE_S * 1000} < b.gm_key_from_ms"),
    (KEY_BACKLOG_REASON, f"b.gm_key_until_ms >= 0 AND {_NOW_MS} > b.gm_key_until_ms + {MAX_BACKLOG_S * 1000}"),
)
MADE_CHECKS = (
    *ARRIVAL_CHECKS,
    (MADE_FUTURE_REASON, f"b.gm_key_until_ms >= 0 AND b.made_at > {_NOW_MS} + {FUTURE_TOLERANCE_S * 1000}"),
    (KEY_FROM_REASON, "b.gm_key_from_ms >= 0 AND b.made_at < b.gm_key_from_ms"),
    (KEY_UNTIL_REASON, "b.gm_key_until_ms >= 0 AND b.made_at >= b.gm_key_until_ms"),
)


def key_checks(made_at: bool, end: str = "w.window_end") -> tuple[tuple[str, str], ...]:
    """The key-validity checks of a batch's windows (``end``: the window's end column)."""
    if not made_at:
        return (*ARRIVAL_CHECKS, (KEY_UNTIL_OLD_REASON, f"b.gm_key_until_ms >= 0 AND {end} > b.gm_key_until_ms"))
    return (*MADE_CHECKS, (KEY_LATE_REASON, late_window_sql(end)))


def late_window_sql(end: str) -> str:
    """A window of a batch signed by a key with an end that ends after the batch was made (+ tolerance)."""
    return f"b.gm_key_until_ms >= 0 AND {end} > b.made_at + {FUTURE_TOLERANCE_S * 1000}"


KEY_REASONS = tuple(r for r, _ in (*MADE_CHECKS, *key_checks(True), *key_checks(False)))

WINDOW_CHECKS: tuple[tuple[str, str], ...] = (
    (
        "record_id does not match (host_id, gpu_uuid, firm_id, window_start)",
        "w.record_id != substring(lower(hex(SHA256(concat(w.host_id, '\\x1f', w.gpu_uuid, '\\x1f', "
        "w.firm_id, '\\x1f', toString(w.window_start))))), 1, 32)",
    ),
    ("window host_id differs from the batch host_id", "w.host_id != b.host_id"),
    (SIGNER_HOST_REASON, "b.gm_signer_host != '' AND b.host_id != b.gm_signer_host"),
    (
        "provider_id is not the registered provider of the host",
        "b.gm_signer_provider != '' AND w.provider_id != b.gm_signer_provider",
    ),
    ("window_end <= window_start", "w.window_end <= w.window_start"),
    ("window_start before 2000-01-01", f"w.window_start < {EARLIEST_WINDOW_MS}"),
    # the loader's clock, never the producer's timestamp (unsigned, and 0 when absent); checked before
    # any arithmetic on the window's length, so no later product can wrap around
    (
        f"window_end more than {FUTURE_TOLERANCE_S} s after the loader's clock",
        f"w.window_end > intDiv(b.gm_ingested_at_us, 1000) + {FUTURE_TOLERANCE_S * 1000}",
    ),
    ("window longer than a day", f"w.window_end - w.window_start > {MAX_WINDOW_MS}"),
    (
        "firm_id is not a firm id (letters, digits, then . _ -; at most 64)",
        f"w.firm_id != '{UNATTRIBUTED}' AND NOT match(w.firm_id, '^{FIRM_ID_PATTERN}$')",
    ),
    ("seq < 0", "w.seq < 0"),
    ("allocated_seconds < 0", "w.allocated_seconds < 0"),
    # compared in whole seconds: allocated_seconds * 1000 wraps around Int64 for a large enough value
    ("allocated_seconds > window length", "w.allocated_seconds > intDiv(w.window_end - w.window_start, 1000)"),
    (
        "busy_seconds outside [0, allocated_seconds]",
        "w.busy_seconds IS NOT NULL AND (isNaN(assumeNotNull(w.busy_seconds)) "
        "OR assumeNotNull(w.busy_seconds) < 0 OR assumeNotNull(w.busy_seconds) > w.allocated_seconds)",
    ),
    (
        "energy_joules above what the GPU class can draw",
        "w.energy_joules IS NOT NULL AND (isNaN(assumeNotNull(w.energy_joules)) "
        "OR assumeNotNull(w.energy_joules) < 0 "
        "OR assumeNotNull(w.energy_joules) > {max_watts} * (w.window_end - w.window_start) / 1000)",
    ),
    (
        "samples_taken outside [0, allocated_seconds]",  # the agent samples at most once a second
        "w.samples_taken IS NOT NULL AND (assumeNotNull(w.samples_taken) < 0 "
        "OR assumeNotNull(w.samples_taken) > w.allocated_seconds)",
    ),
    (
        "samples_taken + samples_missed above the window's seconds",
        "w.samples_missed IS NOT NULL AND (assumeNotNull(w.samples_missed) < 0 "
        "OR ifNull(w.samples_taken, 0) + assumeNotNull(w.samples_missed) "
        "> intDiv(w.window_end - w.window_start, 1000))",
    ),
)

# a prefix column's default where 0 is not "nothing" (the key's bounds: -1 is no bound)
PREFIX_DEFAULTS = {"gm_key_from_ms": " DEFAULT -1", "gm_key_until_ms": " DEFAULT -1"}

INGEST_JOIN = "ARRAY JOIN windows AS w, arrayWithConstant(length(windows), length(windows)) AS n_windows"

# (reason, SQL condition over the ARRAY JOINed GPU window `g` and the batch columns); first match wins.
# A GPU window that fails one goes to usage_quarantine, its record_id "gw:<gpu_uuid>:<window_start ms>",
# its reason prefixed "GPU window: ".
GPU_WINDOW_PARTS_SQL = ("g.allocated_seconds", "g.unattributed_seconds", "g.idle_seconds", "g.unread_seconds",
                        "g.unsampled_seconds")  # fmt: skip
GPU_WINDOW_CHECKS: tuple[tuple[str, str], ...] = (
    (f"batch of more than {MAX_WINDOWS_PER_BATCH} GPU windows", f"n_gpu_windows > {MAX_WINDOWS_PER_BATCH}"),
    *key_checks(True, "g.window_end"),  # GPU windows come from v4 on, which has made_at
    ("host_id differs from the batch host_id", "g.host_id != b.host_id"),
    (SIGNER_HOST_REASON, "b.gm_signer_host != '' AND b.host_id != b.gm_signer_host"),
    (
        "provider_id is not the registered provider of the host",
        "b.gm_signer_provider != '' AND g.provider_id != b.gm_signer_provider",
    ),
    ("window_end <= window_start", "g.window_end <= g.window_start"),
    ("window_start before 2000-01-01", f"g.window_start < {EARLIEST_WINDOW_MS}"),
    (
        f"window_end more than {FUTURE_TOLERANCE_S} s after the loader's clock",
        f"g.window_end > intDiv(b.gm_ingested_at_us, 1000) + {FUTURE_TOLERANCE_S * 1000}",
    ),
    ("window longer than a day", f"g.window_end - g.window_start > {MAX_WINDOW_MS}"),
    # on its own grid, as the agent aligns windows: windows of one length never overlap
    ("window_start is not a multiple of its length", "g.window_start % (g.window_end - g.window_start) != 0"),
    ("seq < 0", "g.seq < 0"),
    (
        "a count of seconds outside [0, window length]",
        " OR ".join(f"{c} < 0 OR {c} > intDiv(g.window_end - g.window_start, 1000)" for c in GPU_WINDOW_PARTS_SQL),
    ),
    # each part is at most a day's seconds now, so the sum cannot wrap around
    (
        "its seconds do not add up to the window's length",
        f"({' + '.join(GPU_WINDOW_PARTS_SQL)}) * 1000 != g.window_end - g.window_start",
    ),
    # a usage window holds at least one sample, at most one a second
    (
        "usage_windows outside [0, window length]",
        "g.usage_windows < 0 OR g.usage_windows > intDiv(g.window_end - g.window_start, 1000)",
    ),
)
# a GPU window's quarantine row names it (no window has a record_id): the loader counts it apart from
# the usage windows it rejected and from a message rejected whole (``record_id = ''``)
GPU_WINDOW_REJECT_PREFIX = "gw:"
GPU_WINDOW_REASON_PREFIX = "GPU window: "
GPU_WINDOW_JOIN = (
    "ARRAY JOIN gpu_windows AS g, arrayWithConstant(length(gpu_windows), length(gpu_windows)) AS n_gpu_windows"
)


def gpu_window_reason_sql() -> str:
    """multiIf over GPU_WINDOW_CHECKS: '' for a GPU window that passes, else the first failed reason."""
    parts = []
    for reason, condition in GPU_WINDOW_CHECKS:
        parts += [f"({condition})", "'" + (GPU_WINDOW_REASON_PREFIX + reason).replace("'", "\\'") + "'"]
    return "multiIf(" + ", ".join(parts) + ", '')"


# usage_raw's sort key: one GPU's window together, each record's deliveries together in arrival order
# (usage_store.first_delivery_sql reads in it). Databases sorted otherwise are re-sorted once
# (clickhouse.ensure_schema).
RAW_ORDER = "gpu_uuid, window_start, record_id, ingested_at, kafka_partition, kafka_offset"

_AVRO_TO_CH = {"string": "String", "long": "Int64", "int": "Int32", "double": "Float64",
               "float": "Float32", "boolean": "Bool", "bytes": "String"}  # fmt: skip


def ch_type(avro: Any) -> str:
    """ClickHouse column type that FORMAT Avro reads an Avro type into."""
    if isinstance(avro, str):
        return _AVRO_TO_CH[avro]
    if isinstance(avro, list):
        inner = [t for t in avro if t != "null"]
        if len(inner) == 1 and len(avro) == 2:
            return f"Nullable({ch_type(inner[0])})"
        raise ValueError(f"unsupported Avro union {avro}")
    if avro["type"] == "array":
        return f"Array({ch_type(avro['items'])})"
    if avro["type"] == "record":
        return "Tuple(" + ", ".join(f"{f['name']} {ch_type(f['type'])}" for f in avro["fields"]) + ")"
    return ch_type(avro["type"])


def _max_watts_sql() -> str:
    classes = sorted(MAX_WATTS_BY_CLASS)
    names = ", ".join(f"'{c}'" for c in classes)
    watts = ", ".join(str(MAX_WATTS_BY_CLASS[c]) for c in classes)
    return f"transform(w.gpu_class, [{names}], [{watts}], {DEFAULT_MAX_WATTS})"


# a writer version may lack these; a missing one reads as NULL of this type
OPTIONAL_WINDOW_FIELDS = {
    "busy_seconds": "Nullable(Float64)",
    "energy_joules": "Nullable(Float64)",
    "samples_taken": "Nullable(Int64)",
    "samples_missed": "Nullable(Int64)",
}


def reject_reason_sql(window_fields: Iterable[str] | None = None, batch: bool = False, made_at: bool = False) -> str:
    """multiIf over WINDOW_CHECKS: '' for a window that passes, else the first failed rule's reason.

    ``window_fields``: the writer version's window fields; an optional one it lacks reads as NULL.
    ``batch``: a Kafka batch's windows, so BATCH_CHECKS and the key's validity (``key_checks``; the
    writer has ``made_at`` or not) come first.
    """
    present = set(OPTIONAL_WINDOW_FIELDS if window_fields is None else window_fields)
    parts = []
    checks = (*BATCH_CHECKS, *key_checks(made_at), *WINDOW_CHECKS) if batch else WINDOW_CHECKS
    for reason, condition in checks:
        for name, null_type in OPTIONAL_WINDOW_FIELDS.items():
            if name not in present:
                condition = condition.replace(f"w.{name}", f"CAST(NULL, '{null_type}')")
        parts.append("(" + condition.replace("{max_watts}", _max_watts_sql()) + ")")
        parts.append("'" + reason.replace("'", "\\'") + "'")
    return "multiIf(" + ", ".join(parts) + ", '')"


class Ddl:
    """Statement text for one database, optionally ON CLUSTER with Replicated engines."""

    def __init__(self, database: str, cluster: str | None = None) -> None:
        self.db = database
        self.cluster = cluster
        self.on = f" ON CLUSTER {cluster}" if cluster else ""

    def engine(self, table: str, kind: str = "MergeTree", args: str = "") -> str:
        if not self.cluster:
            return f"{kind}({args})" if args else kind
        path = f"'/clickhouse/tables/{{shard}}/{self.db}/{table}', '{{replica}}'"
        return f"Replicated{kind}({path}{', ' + args if args else ''})"

    def dedup_setting(self) -> str:
        name = "replicated_deduplication_window" if self.cluster else "non_replicated_deduplication_window"
        return f"{name} = {DEDUP_WINDOW}"

    def raw_table(self) -> str:
        return f"""CREATE TABLE IF NOT EXISTS {self.db}.usage_raw{self.on} (
    record_id String,
    seq UInt64,
    provider_id LowCardinality(String),
    host_id LowCardinality(String),
    gpu_uuid LowCardinality(String),
    gpu_class LowCardinality(String),
    firm_id LowCardinality(String),
    window_start DateTime64(3, 'UTC'),
    window_end DateTime64(3, 'UTC'),
    allocated_seconds UInt32,
    busy_seconds Nullable(Float64),
    energy_joules Nullable(Float64),
    agent_version LowCardinality(String),
    source LowCardinality(String),
    kafka_partition Int32,
    kafka_offset Int64,
    ingested_at DateTime64(6, 'UTC'),
    samples_taken Nullable(UInt32),
    samples_missed Nullable(UInt32)
)
ENGINE = {self.engine("usage_raw")}
PARTITION BY toYYYYMM(window_start)
ORDER BY ({RAW_ORDER})
SETTINGS {self.dedup_setting()}"""

    def quarantine_table(self) -> str:
        return f"""CREATE TABLE IF NOT EXISTS {self.db}.usage_quarantine{self.on} (
    raw String,
    reason String,
    source LowCardinality(String),
    kafka_partition Int32,
    kafka_offset Int64,
    quarantined_at DateTime64(6, 'UTC'),
    record_id String DEFAULT '',
    block_id String DEFAULT '',
    headers String DEFAULT ''
)
ENGINE = {self.engine("usage_quarantine")}
ORDER BY (source, kafka_partition, kafka_offset)
SETTINGS {self.dedup_setting()}"""

    def blocks_table(self) -> str:
        """The loader's ledger: one row per block whose every insert went in, written after them. A
        replay of a block found here is not inserted again (however long ago it loaded)."""
        return f"""CREATE TABLE IF NOT EXISTS {self.db}.usage_blocks{self.on} (
    topic LowCardinality(String),
    kafka_partition Int32,
    first_offset Int64,
    last_offset Int64,
    digest String,
    messages UInt32,
    windows UInt64,
    quarantined UInt32,
    loaded_at DateTime64(6, 'UTC')
)
ENGINE = {self.engine("usage_blocks")}
ORDER BY (topic, kafka_partition, first_offset, digest)
SETTINGS {self.dedup_setting()}"""

    def requeued_table(self) -> str:
        """``pipeline requeue``'s ledger: each quarantined message it tried again (by partition, offset
        and the SHA-256 of its bytes), with the outcome; a message loaded once is never tried again."""
        return f"""CREATE TABLE IF NOT EXISTS {self.db}.usage_requeued{self.on} (
    kafka_partition Int32,
    kafka_offset Int64,
    digest String,
    outcome LowCardinality(String),
    reason String,
    windows UInt32,
    requeued_at DateTime64(6, 'UTC')
)
ENGINE = {self.engine("usage_requeued")}
ORDER BY (kafka_partition, kafka_offset, digest)"""

    def raw_samples_columns(self) -> list[str]:
        """For databases created before writer version 2 carried sample counts."""
        return [
            f"ALTER TABLE {self.db}.usage_raw{self.on} ADD COLUMN IF NOT EXISTS {name} Nullable(UInt32)"
            for name in ("samples_taken", "samples_missed")
        ]

    def quarantine_columns(self) -> list[str]:
        """For databases created before quarantine rows named their window (record_id), the loader's
        block they came in (block_id: a topic made again reuses partitions and offsets) and, for a
        message the loader rejected itself, its Kafka headers (JSON; ``pipeline requeue`` verifies
        its signature again)."""
        return [
            f"ALTER TABLE {self.db}.usage_quarantine{self.on} ADD COLUMN IF NOT EXISTS {name} String DEFAULT ''"
            for name in ("record_id", "block_id", "headers")
        ]

    def ingest_table(self, writer: WriterVersion) -> str:
        cols = [f"    {name} {ch}{PREFIX_DEFAULTS.get(name, '')}" for name, _, ch in PREFIX_FIELDS]
        cols += [f"    {f['name']} {ch_type(f['type'])}" for f in writer.schema["fields"]]
        body = ",\n".join(cols)
        return f"CREATE TABLE IF NOT EXISTS {self.db}.{writer.ingest_table}{self.on} (\n{body}\n)\nENGINE = Null"

    def ingest_prefix_columns(self, writer: WriterVersion) -> list[str]:
        """For ingest tables created before the loader put a field in each message's prefix (its block,
        the signing key's validity): ClickHouse reads the container's fields by name."""
        types = {name: ch for name, _, ch in PREFIX_FIELDS}
        return [
            f"ALTER TABLE {self.db}.{writer.ingest_table}{self.on} ADD COLUMN IF NOT EXISTS {name} {types[name]}"
            f"{PREFIX_DEFAULTS.get(name, '')}"
            for name in ADDED_PREFIX_FIELDS
        ]

    def view_names(self, writer: WriterVersion) -> tuple[str, str]:
        """(to_raw, to_quarantine) view names of a writer version under today's checks: the names
        carry a digest of the checks, so a database made under other checks gets new views beside
        its old ones, and ``clickhouse.ensure_schema`` then drops the old (``stale_views``)."""
        text = f"{VIEWS_REVISION}:{reject_reason_sql(_window_fields(writer), batch=True, made_at=_made_at(writer))}"
        digest = hashlib.sha256(text.encode()).hexdigest()[:10]
        return f"{writer.ingest_table}_to_raw_{digest}", f"{writer.ingest_table}_to_quarantine_{digest}"

    def ingest_views(self, writer: WriterVersion) -> list[str]:
        """Two views per writer version: passing windows -> usage_raw, failing ones -> usage_quarantine."""
        window_fields = _window_fields(writer)
        src = f"{self.db}.{writer.ingest_table}"
        to_raw, to_quarantine = self.view_names(writer)
        reason = reject_reason_sql(window_fields, batch=True, made_at=_made_at(writer))

        def opt(name: str, ch_type: str = "Nullable(Float64)") -> str:  # a field an older writer lacks is NULL
            return f"CAST(w.{name}, '{ch_type}')" if name in window_fields else f"CAST(NULL, '{ch_type}')"

        raw = f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {self.db}.{to_raw}{self.on}
TO {self.db}.usage_raw AS
SELECT
    w.record_id AS record_id, toUInt64(w.seq) AS seq, w.provider_id AS provider_id, w.host_id AS host_id,
    w.gpu_uuid AS gpu_uuid, w.gpu_class AS gpu_class, w.firm_id AS firm_id,
    fromUnixTimestamp64Milli(w.window_start, 'UTC') AS window_start,
    fromUnixTimestamp64Milli(w.window_end, 'UTC') AS window_end,
    toUInt32(w.allocated_seconds) AS allocated_seconds,
    {opt("busy_seconds")} AS busy_seconds, {opt("energy_joules")} AS energy_joules,
    b.agent_version AS agent_version, 'kafka' AS source, b.gm_partition AS kafka_partition,
    b.gm_offset AS kafka_offset, fromUnixTimestamp64Micro(b.gm_ingested_at_us, 'UTC') AS ingested_at,
    {opt("samples_taken", "Nullable(UInt32)")} AS samples_taken,
    {opt("samples_missed", "Nullable(UInt32)")} AS samples_missed
FROM {src} AS b
{INGEST_JOIN}
WHERE {reason} = ''"""
        quarantine = f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {self.db}.{to_quarantine}{self.on}
TO {self.db}.usage_quarantine AS
SELECT
    toJSONString(w) AS raw, {reason} AS reason, 'kafka' AS source,
    b.gm_partition AS kafka_partition, b.gm_offset AS kafka_offset,
    fromUnixTimestamp64Micro(b.gm_ingested_at_us, 'UTC') AS quarantined_at, w.record_id AS record_id,
    b.gm_block AS block_id
FROM {src} AS b
{INGEST_JOIN}
WHERE reason != ''"""
        return [raw, quarantine]

    def messages_table(self) -> str:
        """One row per v3+ message (a batch or a heartbeat): what the agent had numbered when it made
        it, and when it arrived. ``pipeline gaps`` reads missing tails and silent hosts from it."""
        return f"""CREATE TABLE IF NOT EXISTS {self.db}.agent_messages{self.on} (
    host_id LowCardinality(String),
    high_water_seq Int64,
    made_at DateTime64(3, 'UTC'),
    windows UInt32,
    kafka_partition Int32,
    kafka_offset Int64,
    ingested_at DateTime64(6, 'UTC')
)
ENGINE = {self.engine("agent_messages")}
ORDER BY (host_id, ingested_at)
SETTINGS {self.dedup_setting()}"""

    def messages_view_name(self, writer: WriterVersion) -> str | None:
        """The view from a writer version's ingest table to ``agent_messages``; None before v3."""
        if "high_water_seq" not in {f["name"] for f in writer.schema["fields"]}:
            return None
        return f"{writer.ingest_table}_to_messages_{VIEWS_REVISION}"

    def messages_view(self, writer: WriterVersion) -> list[str]:
        """A message counts for its host only if the signing key is that host's (or nothing is
        checked) and it was made inside the key's validity; ``made_at`` is clamped into 1970-2100, so
        no agent clock can make the insert fail."""
        name = self.messages_view_name(writer)
        if name is None:
            return []
        return [
            f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {self.db}.{name}{self.on}
TO {self.db}.agent_messages AS
SELECT
    b.host_id AS host_id, b.high_water_seq AS high_water_seq,
    fromUnixTimestamp64Milli(least(greatest(b.made_at, 0), 4102444800000), 'UTC') AS made_at,
    toUInt32(length(b.windows)) AS windows, b.gm_partition AS kafka_partition, b.gm_offset AS kafka_offset,
    fromUnixTimestamp64Micro(b.gm_ingested_at_us, 'UTC') AS ingested_at
FROM {self.db}.{writer.ingest_table} AS b
WHERE (b.gm_signer_host = '' OR b.host_id = b.gm_signer_host)
    AND NOT ({" OR ".join(f"({condition})" for _, condition in MADE_CHECKS)})
    AND NOT arrayExists(x -> ({late_window_sql("tupleElement(x, 'window_end')")}), b.windows)"""
        ]

    def gpu_windows_table(self) -> str:
        """(v4) Every delivery of a GPU window that passed GPU_WINDOW_CHECKS: per GPU and window, its
        seconds allocated, unattributed, idle, unread and unsampled (gpumeter/CONTRACT.md). A window
        delivered again is read once (``LIMIT 1 BY``, the first delivery: ``usage_store.first_gpu_windows_sql``)."""
        return f"""CREATE TABLE IF NOT EXISTS {self.db}.gpu_windows{self.on} (
    seq UInt64,
    provider_id LowCardinality(String),
    host_id LowCardinality(String),
    gpu_uuid LowCardinality(String),
    gpu_class LowCardinality(String),
    window_start DateTime64(3, 'UTC'),
    window_end DateTime64(3, 'UTC'),
    allocated_seconds UInt32,
    unattributed_seconds UInt32,
    idle_seconds UInt32,
    unread_seconds UInt32,
    unsampled_seconds UInt32,
    usage_windows UInt32,
    agent_version LowCardinality(String),
    kafka_partition Int32,
    kafka_offset Int64,
    ingested_at DateTime64(6, 'UTC')
)
ENGINE = {self.engine("gpu_windows")}
PARTITION BY toYYYYMM(window_start)
ORDER BY (host_id, gpu_uuid, window_start, ingested_at, kafka_partition, kafka_offset)
SETTINGS {self.dedup_setting()}"""

    def gpu_view_names(self, writer: WriterVersion) -> tuple[str, str] | None:
        """(to_gpu_windows, to_quarantine) view names of a writer version that carries GPU windows
        (None before v4), named by a digest of GPU_WINDOW_CHECKS like ``view_names``."""
        if "gpu_windows" not in {f["name"] for f in writer.schema["fields"]}:
            return None
        digest = hashlib.sha256(f"{VIEWS_REVISION}:{gpu_window_reason_sql()}".encode()).hexdigest()[:10]
        return f"{writer.ingest_table}_to_gpu_{digest}", f"{writer.ingest_table}_to_gpu_quarantine_{digest}"

    def gpu_views(self, writer: WriterVersion) -> list[str]:
        names = self.gpu_view_names(writer)
        if names is None:
            return []
        src = f"{self.db}.{writer.ingest_table}"
        reason = gpu_window_reason_sql()
        seconds = ", ".join(f"toUInt32({c}) AS {c[2:]}" for c in GPU_WINDOW_PARTS_SQL)
        to_gpu = f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {self.db}.{names[0]}{self.on}
TO {self.db}.gpu_windows AS
SELECT
    toUInt64(g.seq) AS seq, g.provider_id AS provider_id, g.host_id AS host_id, g.gpu_uuid AS gpu_uuid,
    g.gpu_class AS gpu_class, fromUnixTimestamp64Milli(g.window_start, 'UTC') AS window_start,
    fromUnixTimestamp64Milli(g.window_end, 'UTC') AS window_end, {seconds},
    toUInt32(g.usage_windows) AS usage_windows, b.agent_version AS agent_version,
    b.gm_partition AS kafka_partition, b.gm_offset AS kafka_offset,
    fromUnixTimestamp64Micro(b.gm_ingested_at_us, 'UTC') AS ingested_at
FROM {src} AS b
{GPU_WINDOW_JOIN}
WHERE {reason} = ''"""
        to_quarantine = f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {self.db}.{names[1]}{self.on}
TO {self.db}.usage_quarantine AS
SELECT
    toJSONString(g) AS raw, {reason} AS reason, 'kafka' AS source,
    b.gm_partition AS kafka_partition, b.gm_offset AS kafka_offset,
    fromUnixTimestamp64Micro(b.gm_ingested_at_us, 'UTC') AS quarantined_at,
    concat('{GPU_WINDOW_REJECT_PREFIX}', g.gpu_uuid, ':', toString(g.window_start)) AS record_id,
    b.gm_block AS block_id
FROM {src} AS b
{GPU_WINDOW_JOIN}
WHERE reason != ''"""
        return [to_gpu, to_quarantine]

    def stale_views(self, writers: Iterable[WriterVersion], existing: Iterable[str]) -> list[str]:
        """DROP statements for the views among ``existing`` (table names in the database) that feed
        from an ingest table but are not today's (``view_names``). Run after the new views exist, so
        no block goes through neither; a block that goes through both is delivered twice, with the
        same content, and counts once."""
        writers = list(writers)
        current = {name for w in writers for name in self.view_names(w)}
        current |= {name for w in writers if (name := self.messages_view_name(w))}
        current |= {name for w in writers for name in (self.gpu_view_names(w) or ())}
        prefixes = tuple(f"{w.ingest_table}_to_" for w in writers)
        return [
            f"DROP VIEW IF EXISTS {self.db}.{name}{self.on}"
            for name in sorted(existing)
            if name.startswith(prefixes) and name not in current
        ]

    def drop_windows_view(self) -> str:
        """Databases made before 0.2 had a ``usage_windows`` view with a first-delivery definition of its
        own; every read now goes through ``usage_store.first_delivery_sql``, so the view is dropped."""
        return f"DROP VIEW IF EXISTS {self.db}.usage_windows{self.on}"

    def hourly_table(self) -> str:
        return f"""CREATE TABLE IF NOT EXISTS {self.db}.usage_hourly{self.on} (
    hour DateTime('UTC'),
    provider_id LowCardinality(String),
    gpu_class LowCardinality(String),
    firm_id LowCardinality(String),
    allocated_seconds UInt64,
    records UInt64,
    refreshed_at DateTime64(6, 'UTC')
)
ENGINE = {self.engine("usage_hourly", "ReplacingMergeTree", "refreshed_at")}
ORDER BY (hour, provider_id, gpu_class, firm_id)"""

    def fleet_tables(self) -> list[str]:
        """The fleet registry (``gpumeter.fleet``): every loaded version's devices, and the versions.
        A version exists once its row is in ``fleet_versions``: devices of a load that died before it
        are never read, and their version number is never used again."""
        devices = f"""CREATE TABLE IF NOT EXISTS {self.db}.fleet_devices{self.on} (
    version UInt32,
    line UInt32,
    provider_id LowCardinality(String),
    host_id LowCardinality(String),
    gpu_uuid String,
    gpu_class LowCardinality(String),
    window_seconds UInt32,
    valid_from DateTime('UTC'),
    valid_to DateTime('UTC'),
    parent_uuid String
)
ENGINE = {self.engine("fleet_devices")}
ORDER BY (version, gpu_uuid, valid_from)"""
        versions = f"""CREATE TABLE IF NOT EXISTS {self.db}.fleet_versions{self.on} (
    version UInt32,
    digest String,
    source String,
    devices UInt32,
    loaded_at DateTime64(6, 'UTC')
)
ENGINE = {self.engine("fleet_versions")}
ORDER BY version"""
        return [devices, versions]

    def hold_tables(self) -> list[str]:
        """What settlements recorded of held records, and staff's decisions (docs/usage-checks.md).
        Rows are only ever added; a record's latest row (by settlement, by decision time) is its state."""
        holds = f"""CREATE TABLE IF NOT EXISTS {self.db}.usage_holds{self.on} (
    store_id String,
    record_id String,
    settlement_seq UInt32,
    month String,
    state LowCardinality(String),
    reason LowCardinality(String),
    firm_id LowCardinality(String),
    provider_id LowCardinality(String),
    host_id LowCardinality(String),
    gpu_uuid String,
    gpu_class LowCardinality(String),
    window_start DateTime64(3, 'UTC'),
    allocated_seconds UInt32,
    written_at DateTime64(6, 'UTC')
)
ENGINE = {self.engine("usage_holds")}
ORDER BY (store_id, record_id, settlement_seq)"""
        decisions = f"""CREATE TABLE IF NOT EXISTS {self.db}.usage_decisions{self.on} (
    store_id String,
    record_id String,
    decision LowCardinality(String),
    decided_by String,
    decided_at DateTime64(6, 'UTC'),
    reason String
)
ENGINE = {self.engine("usage_decisions")}
ORDER BY (store_id, record_id, decided_at)"""
        return [holds, decisions]

    def statements(self, writers: Iterable[WriterVersion]) -> list[str]:
        """Every statement, in order; each is idempotent."""
        out = [
            self.raw_table(),
            *self.raw_samples_columns(),
            self.quarantine_table(),
            *self.quarantine_columns(),
            self.blocks_table(),
            self.messages_table(),
            self.gpu_windows_table(),
            self.requeued_table(),
        ]
        for writer in sorted(writers, key=lambda w: w.version):
            out += [self.ingest_table(writer), *self.ingest_prefix_columns(writer)]
            out += self.ingest_views(writer) + self.messages_view(writer) + self.gpu_views(writer)
        out += [self.drop_windows_view(), self.hourly_table(), *self.fleet_tables(), *self.hold_tables()]
        return out


def _made_at(writer: WriterVersion) -> bool:
    return "made_at" in {f["name"] for f in writer.schema["fields"]}


def _window_fields(writer: WriterVersion) -> set[str]:
    for field in writer.schema["fields"]:
        if field["name"] == "windows":
            return {f["name"] for f in field["type"]["items"]["fields"]}
    raise ValueError(f"writer version {writer.version} has no windows array")
