"""Settle one month for 10,000 firms over 100 million usage windows.

The windows are generated inside ClickHouse (INSERT ... SELECT FROM numbers),
plus 0.5 % re-delivered duplicates so deduplication has real work. Then
``gpumeter billing settle`` runs in its own process, exactly as billing staff
run it; its wall time and peak RSS are the figures.

Before measuring, the generated parts are merged (OPTIMIZE ... FINAL), as a month
of ingestion would have left them: otherwise ClickHouse's background merges of
the ~70 freshly generated parts (about 8 minutes of one core) run inside the
settlement and take its cores.

Baseline, in the same script on the same data: one plain GROUP BY over every raw
row with no deduplication and no billing - the floor any settlement must pay
to read the month. ``BENCH_SETTLE_WINDOWS`` overrides the size for a quick run.

Then the settlement's read on its own: with the usage checks (registry, conservation per GPU
window, firms, horizon; ``settle_checked_pass_s``) against the same read without them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from gpumeter.fleet import FLEET_COLUMNS
from pipeline.clickhouse import RAW_COLUMNS

FIRMS = 10_000
WINDOWS = int(os.environ.get("BENCH_SETTLE_WINDOWS", "100000000"))
MONTH_MINUTES = 31 * 24 * 60
COLUMNS = ", ".join(RAW_COLUMNS)

# A registered fleet of GPUS GPUs, busy: slot n is GPU n % GPUS in minute n // GPUS, so no GPU's
# minute is claimed twice (100M windows fill 2241 GPUs for the month). GPU g belongs to provider
# g % 7, is of class (g // 7) % 4, sits in a host of 8 with its provider's neighbours. Its firm is
# one whose provider is g's and whose two classes include g's (firm f uses provider f % 7 and
# classes f % 4, f % 4 + 1): the same
# ~620k (firm, day, provider, class) groups as a settlement of 10,000 firms has in the field.
GENERATE = """
INSERT INTO {db}.usage_raw ({columns})
SELECT
    lower(hex(MD5(toString(number)))) AS record_id, number AS seq,
    concat('P', toString(p)) AS provider_id,
    concat('P', toString(p), '-H', toString(intDiv(g, 56))) AS host_id,
    concat('GPU-', toString(g)) AS gpu_uuid,
    ['H100-80G', 'A800-80G', 'Ascend-910B', 'L40S-48G'][c + 1] AS gpu_class,
    concat('F', leftPad(toString((8 * p + 21 * ((c + 4 - number % 2) % 4)) % 28
                                 + 28 * ((number * 2654435761) % 357)), 5, '0')) AS firm_id,
    toDateTime64('2026-03-01 00:00:00', 3, 'UTC') + toIntervalSecond(60 * intDiv(number, {gpus})) AS window_start,
    window_start + toIntervalSecond(60) AS window_end,
    60 AS allocated_seconds, 30.0 AS busy_seconds, 21000.0 AS energy_joules,
    'bench' AS agent_version, 'kafka' AS source, toInt32(number % 8) AS kafka_partition,
    toInt64(number) AS kafka_offset, toDateTime64('2026-04-01 00:00:00', 6, 'UTC') AS ingested_at
FROM (SELECT number, number % {gpus} AS g, g % 7 AS p, intDiv(g, 7) % 4 AS c
      FROM numbers({start}, {count}))
"""
CLASSES = ("H100-80G", "A800-80G", "Ascend-910B", "L40S-48G")


GPUS = -(-100_000_000 // MONTH_MINUTES)  # 2241: 100M windows fill them for the month


def fleet_rows() -> list[str]:
    """The registry of the generated fleet (see GENERATE)."""
    return [
        f"P{g % 7},P{g % 7}-H{g // 56},GPU-{g},{CLASSES[(g // 7) % 4]},60,2026-01-01T00:00:00Z,," for g in range(GPUS)
    ]


RATES = """currency = "CNY"
timezone = "UTC"
""" + "".join(
    f'\n[[rate]]\ngpu_class = "{cls}"\nprovider = "*"\nprice_per_gpu_hour = "{price}"\neffective_from = 2026-01-01\n'
    for cls, price in (("H100-80G", "21.50"), ("A800-80G", "12.80"), ("Ascend-910B", "9.90"), ("L40S-48G", "6.40"))
)

PROGRAMS = """[[program]]
id = "SH-2026-COMPUTE"
year = 2026
category = "compute"
budget = "10000000.00"
firm_cap = "2500.00"

[program.auto_grant]
face_value = "2000.00"
subsidy_rate = "0.50"
"""


def _write_inputs(work: Path) -> list[str]:
    (work / "rates.toml").write_text(RATES)
    (work / "programs.toml").write_text(PROGRAMS)
    vouchers = ["voucher_id,program_id,firm_id,face_value,subsidy_rate,valid_from,valid_until,priority"]
    for f in range(0, FIRMS, 10):  # one firm in ten holds its own voucher (30-100 %)
        rate = ("0.3", "0.5", "0.8", "1")[f % 4]
        vouchers.append(f"V{f:05d},SH-2026-COMPUTE,F{f:05d},3000.00,{rate},2026-01-01,2026-12-31,10")
    (work / "vouchers.csv").write_text("\n".join(vouchers) + "\n")
    firms = ["firm_id,name,payment_terms_days"] + [f"F{f:05d},Firm {f},30" for f in range(FIRMS)]
    (work / "firms.csv").write_text("\n".join(firms) + "\n")
    (work / "fleet.csv").write_text("\n".join([",".join(FLEET_COLUMNS), *fleet_rows()]) + "\n")
    return [
        "--ratecard",
        str(work / "rates.toml"),
        "--programs",
        str(work / "programs.toml"),
        "--vouchers",
        str(work / "vouchers.csv"),
        "--firms",
        str(work / "firms.csv"),
    ]


PROBE = (
    "import resource, sys, time; from gpumeter.cli import main; t = time.perf_counter()\n"
    "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
    "print(f'PROBE {time.perf_counter() - t:.3f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}', "
    "file=sys.stderr); sys.exit(code)"
)


def _run(env: dict[str, str], *args: str) -> tuple[float, float, str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"gpumeter {' '.join(args)} failed:\n{proc.stderr}")
    for line in proc.stderr.splitlines():  # the command's own step timings, for the record
        if line.startswith(("[", "  ")):
            print(f"  {line}", file=sys.stderr)
    probe = [ln for ln in proc.stderr.splitlines() if ln.startswith("PROBE ")][-1].split()
    return float(probe[1]), float(probe[2]), proc.stdout


def _generate(home: Path) -> None:
    from pipeline import clickhouse

    client = clickhouse.connect(f"chdb://{home / 'clickhouse'}", "gpumeter")
    clickhouse.ensure_schema(client, "gpumeter")
    # no background merges while generating: the one full merge below does their work once
    client.command("SYSTEM STOP MERGES gpumeter.usage_raw")
    step = 20_000_000
    for start in range(0, WINDOWS, step):
        count = min(step, WINDOWS - start)
        client.command(
            GENERATE.format(db="gpumeter", columns=COLUMNS, gpus=GPUS, firms=FIRMS, start=start, count=count)
        )
        print(f"  generated {start + count:,} of {WINDOWS:,} windows", file=sys.stderr, flush=True)
    dups = max(1, WINDOWS // 200)  # re-delivered windows: same record_id, later ingestion
    client.command(
        GENERATE.format(db="gpumeter", columns=COLUMNS, gpus=GPUS, firms=FIRMS, start=0, count=dups).replace(
            "'2026-04-01 00:00:00', 6", "'2026-04-01 00:05:00', 6"
        )
    )
    # A month of ingestion leaves the month's partition merged by ClickHouse's background merges;
    # bulk generation leaves ~70 fresh parts whose merging would otherwise run inside the settlement
    # (minutes of one core for 100M rows).
    t = time.perf_counter()
    client.command("SYSTEM START MERGES gpumeter.usage_raw")
    # OPTIMIZE waits for a running background merge only this long, then silently does nothing
    client.command(
        "ALTER TABLE gpumeter.usage_raw MODIFY SETTING lock_acquire_timeout_for_background_operations = 86400"
    )
    client.command("OPTIMIZE TABLE gpumeter.usage_raw FINAL", settings={"optimize_throw_if_noop": 1})
    client.command("ALTER TABLE gpumeter.usage_raw RESET SETTING lock_acquire_timeout_for_background_operations")
    print(f"  merged the generated parts in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)


def _floor(home: Path) -> float:
    from pipeline import clickhouse

    client = clickhouse.connect(f"chdb://{home / 'clickhouse'}", "gpumeter")
    t = time.perf_counter()
    client.query(
        "SELECT firm_id, toDate(window_start, 'UTC') AS d, provider_id, gpu_class, sum(allocated_seconds), count() "
        "FROM gpumeter.usage_raw GROUP BY firm_id, d, provider_id, gpu_class"
    )
    return time.perf_counter() - t


def _passes(home: Path, fleet_csv: Path) -> None:
    """Print the seconds of the settlement's read with the usage checks (registry, conservation per GPU
    window, firms, horizon) and of the same read without them, on the month's data."""
    from datetime import UTC, date, datetime

    from gpumeter.fleet import read_fleet
    from pipeline import clickhouse
    from pipeline.usage_checks import Checks
    from pipeline.usage_store import Span, UsageStore

    store = UsageStore(clickhouse.connect(f"chdb://{home / 'clickhouse'}", "gpumeter"), "gpumeter")
    cutoff = datetime(2026, 4, 2, tzinfo=UTC)
    span = Span(date(2026, 3, 31), cutoff)
    checks = Checks(tuple(read_fleet(fleet_csv)), tuple(f"F{f:05d}" for f in range(FIRMS)), cutoff, "bench",
                    datetime(2025, 12, 1, tzinfo=UTC))  # fmt: skip
    t = time.perf_counter()
    plain = sum(r.allocated_seconds for r in store.by_day("UTC", span))
    unchecked = time.perf_counter() - t
    t = time.perf_counter()
    judged = store.checked_by_day("UTC", span, checks, 0)
    checked = time.perf_counter() - t
    if sum(r.allocated_seconds for r in judged if r.hold == "") != plain:  # the bench's fleet is honest
        raise RuntimeError("the checked read billed other seconds than the plain read")
    print(f"{checked:.3f} {unchecked:.3f}")


def _child(env: dict[str, str], call: str) -> str:
    """Run ``bench_settle.<call>`` in a child (this process never holds the chDB path); its stdout."""
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_settle as b, pathlib; {call}"
    proc = subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:  # its progress and errors went to stderr, as they happened
        raise RuntimeError(f"{call} failed (exit {proc.returncode}); see above")
    return proc.stdout


def run() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="gm-bench-settle-") as tmp:
        work = Path(tmp)
        # BENCH_SETTLE_DATA=DIR keeps the generated windows there and reuses them on the next run
        # (generating and merging 100M windows takes about 10 minutes); the billing store is fresh
        kept = os.environ.get("BENCH_SETTLE_DATA")
        home = Path(kept) if kept else work / "home"
        env = {**os.environ, "GPUMETER_HOME": str(home), "GPUMETER_BILLING_DB": f"sqlite:///{work / 'billing.sqlite3'}"}
        env.pop("GPUMETER_CLICKHOUSE_DSN", None)
        marker = home / f"generated-fleet2-{WINDOWS}"  # the registered fleet's windows (an older layout had none)
        if not marker.exists():
            if (home / "clickhouse").exists():
                raise RuntimeError(f"{home} holds data from an unfinished generation: delete it and run again")
            _child(env, f"b._generate(pathlib.Path({str(home)!r}))")
            marker.touch()
        floor_s = float(_child(env, f"print(b._floor(pathlib.Path({str(home)!r})))").strip().splitlines()[-1])
        _run(env, "billing", "load", *_write_inputs(work))
        _run(env, "fleet", "load", str(work / "fleet.csv"))
        seconds, rss_mb, out = _run(env, "billing", "settle", "--month", "2026-03")
        print(out, file=sys.stderr)
        call = f"b._passes(pathlib.Path({str(home)!r}), pathlib.Path({str(work / 'fleet.csv')!r}))"
        checked_s, unchecked_s = map(float, _child(env, call).split()[-2:])
    name = f"settle_{FIRMS // 1000}k_firms_{WINDOWS / 1_000_000:g}m_windows_s"
    yield f"BENCH {name} {seconds:.1f} s vs raw_sum_floor {seconds / floor_s:.2f}x"
    yield f"BENCH settle_peak_rss_mb {rss_mb:.0f} MB"
    # the settlement's one read with the usage checks (conservation per GPU window among them) alone
    yield f"BENCH settle_checked_pass_s {checked_s:.1f} s vs unchecked_pass {checked_s / unchecked_s:.2f}x"


if __name__ == "__main__":
    for line in run():
        print(line, flush=True)
