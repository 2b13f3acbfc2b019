"""``gpumeter demo``: a simulated month of a city compute platform, end to end, on real components.

simulated fleet -> agents -> Avro -> Kafka (a real local broker) -> loader ->
ClickHouse (embedded chDB) -> GPU-hours per firm and class, checked exactly
against the simulator's ground truth.
"""

from __future__ import annotations

import calendar
import fcntl
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from zoneinfo import ZoneInfo

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.kafka_sink import KafkaSink
from agent.runner import Agent, run_simulated
from agent.simulate import SimulatedFleet, TruthKey
from gpumeter.cli import settings_from
from gpumeter.demo.billing_month import run_billing
from gpumeter.demo.broker import LocalBroker, create_topic
from gpumeter.errors import GpumeterError
from gpumeter.fleet import fleet_text, read_fleet
from gpumeter.record import public_key_text
from pipeline import clickhouse, fleet_store
from pipeline.coverage import coverage_table
from pipeline.keys import ED25519, HostKey, KeyRegistry, load_registry, write_registry
from pipeline.loader import Loader, make_consumer
from pipeline.report import gpu_hours_table, hours_text
from pipeline.usage_store import UsageStore

MARKER = ".gpumeter-demo"


class DemoMismatch(GpumeterError):
    code = "demo_mismatch"


def _fresh_dir(path: Path) -> tuple[Path, IO[str]]:
    """An empty demo folder at ``path``, and the open lock file that keeps another demo out of it
    while this process runs (hold it). The old folder, if any, is renamed away before it is deleted,
    so a run killed half-way leaves nothing that looks like anything but a demo folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = (path.parent / f".{path.name}.lock").open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise GpumeterError(
            f"another gpumeter demo is running in {path}; wait for it to finish, or give this one another --workdir"
        ) from None
    if path.is_symlink() or (path.exists() and not (path / MARKER).exists()):
        lock.close()
        raise GpumeterError(f"{path} exists and is not a gpumeter demo folder; choose another --workdir")
    if path.exists():
        path.rename(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    for old in path.parent.glob(f".{path.name}.old-*"):  # this run's, and any a killed run left
        if old.is_dir() and not old.is_symlink() and (old / MARKER).exists():
            _remove_demo_folder(old)
    path.mkdir()
    (path / MARKER).write_text("created by gpumeter demo; safe to delete\n")
    return path, lock


def _remove_demo_folder(path: Path) -> None:
    """Delete a demo folder, its marker last: one interrupted half-way is still known as a demo's."""
    for child in path.iterdir():
        if child.name != MARKER:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    (path / MARKER).unlink()
    path.rmdir()


@click.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the demo's stores and logs (default $GPUMETER_HOME/demo; recreated each run).",
)
@click.option("--month", default="2026-03", show_default=True, help="Simulated month YYYY-MM.")
@click.option("--timezone", "tz", default="Asia/Shanghai", show_default=True, help="Billing time zone.")
@click.option("--seed", default=2026, show_default=True, help="Simulation seed.")
@click.option("--interval", "interval_s", default=20, show_default=True, help="Agent sampling interval (s).")
@click.pass_context
def demo(ctx: click.Context, workdir: Path | None, month: str, tz: str, seed: int, interval_s: int) -> None:
    """Run a simulated city compute platform for a month, end to end, and check it exactly.

    Starts a local Kafka-protocol broker and an embedded ClickHouse, meters a
    simulated fleet (time-compressed), loads it through Kafka, prints GPU-hours
    per firm and class, and compares every (firm, day, provider, class) total
    with the simulator's ground truth. Then settles the month under a city voucher
    program (automatic 30 % grants, a per-firm cap) and a small district pool
    (50-100 %, runs dry), reconciles it, and writes every firm's statement.
    Exit code 1 on any difference.

    \b
    Example:
      gpumeter demo
      gpumeter demo --month 2026-04 --workdir /tmp/gm-demo
    """
    settings = settings_from(ctx)
    zone = ZoneInfo(tz)
    year, mon = (int(x) for x in month.split("-"))
    start = datetime(year, mon, 1, tzinfo=zone)
    nxt = datetime(year + (mon == 12), mon % 12 + 1, 1, tzinfo=zone)
    if nxt > datetime.now(UTC):  # it would meter the month, then refuse to settle it (a month not ended)
        raise GpumeterError(f"--month {month} has not ended yet ({tz}); a demo settles its month: pick an ended one")
    work, _lock = _fresh_dir(workdir or settings.home / "demo")  # held until the demo ends
    days = (nxt - start).days
    t0 = time.monotonic()

    def step(text: str) -> None:
        click.echo(f"[{time.monotonic() - t0:6.1f}s] {text}")

    fleet = SimulatedFleet(
        seed=seed,
        start=start,
        days=days,
        providers=3,
        hosts_per_provider=2,
        gpus_per_host=4,
        firms=6,
        quantum_s=60,
    )
    step(
        f"fleet: {len(fleet.hosts())} hosts, {len(fleet.gpus)} GPUs, {len(fleet.firm_ids)} firms, "
        f"{sum(len(j) for j in fleet.jobs.values())} jobs in {month} ({tz})"
    )
    with LocalBroker(log_path=work / "broker.log") as broker:
        step(f"Kafka-protocol broker (Tansu) listening on {broker.bootstrap}")
        create_topic(broker.bootstrap, settings.topic, partitions=4)
        # every host its own Ed25519 key pair: the private keys stay in this process (the agents'), the
        # loader gets a registry of public keys, written as `gpumeter keys new` writes it
        host_keys = {h.host_id: (f"{h.host_id}.demo", Ed25519PrivateKey.generate()) for h in fleet.hosts()}
        keys_path = work / "keys.toml"
        write_registry(keys_path, KeyRegistry({
            key_id: HostKey(key_id, h.host_id, h.provider_id, ED25519, public_key_text(key.public_key()),
                            valid_from=start.astimezone(UTC), note="gpumeter demo")
            for h in fleet.hosts() for key_id, key in [host_keys[h.host_id]]
        }))  # fmt: skip
        step(f"keys: {len(host_keys)} hosts sign with Ed25519; the loader verifies against {keys_path} (public keys)")
        sink = KafkaSink(broker.bootstrap, settings.topic, host_keys=host_keys)
        agents = [
            Agent(fleet.host_source(h.host_id), h, sink, window_s=60, interval_s=interval_s, batch_windows=400)
            for h in fleet.hosts()
        ]
        start_s, end_s = int(start.timestamp()), int(nxt.timestamp())

        tty = sys.stdout.isatty()
        said = [0]

        def progress(now_s: int) -> None:
            done = (now_s - start_s) / (end_s - start_s)
            if tty:  # one line, rewritten
                click.echo(f"\r  metering: {done:6.1%} of the month", nl=False)
            elif int(done * 4) > said[0]:  # a log or a pipe: a plain line each quarter
                said[0] = int(done * 4)
                step(f"metering: {done:.0%} of the month")

        run_simulated(agents, start_s, end_s, interval_s, progress=progress)
        if tty:
            click.echo()
        sink.flush()
        sink.close()
        step(
            f"agents: {sum(a.samples for a in agents)} samples -> {sink.windows_sent} windows "
            f"in {sink.messages_sent} Kafka messages (acks=all)"
        )

        dsn = f"chdb://{(work / 'clickhouse').resolve()}"
        client = clickhouse.connect(dsn, settings.clickhouse_database)
        clickhouse.ensure_schema(client, settings.clickhouse_database)
        registry = work / "fleet.csv"  # what each provider has: the simulated hosts' inventory
        registry.write_text(
            fleet_text([
                {"provider_id": g.provider_id, "host_id": g.host_id, "gpu_uuid": g.gpu_uuid, "gpu_class": g.gpu_class,
                 "window_seconds": "60", "valid_from": start.isoformat()}
                for g in fleet.gpus
            ])
        )  # fmt: skip
        loaded = fleet_store.load_fleet(client, settings.clickhouse_database, read_fleet(registry), registry.name)
        step(f"fleet registry: {loaded.version.devices} GPUs registered (version {loaded.version.version})")
        consumer = make_consumer(broker.bootstrap, settings.topic, "gpumeter-demo-loader", fast_rebalance=True)
        loader = Loader(consumer, client, settings.clickhouse_database, settings.topic, keys=load_registry(keys_path))
        try:
            stats = loader.run(until=lambda st: st.messages >= sink.messages_sent, idle_timeout_s=60)
        finally:
            consumer.close()
        step(
            f"loader: {stats.messages} messages -> {stats.windows} windows in ClickHouse "
            f"({stats.inserts} inserts, {stats.commits} commits, {stats.quarantined} quarantined)"
        )

    rows = UsageStore(client, settings.clickhouse_database).gpu_seconds_by_day(tz)
    click.echo()
    click.echo(f"GPU-hours per firm and class, {month} ({tz}), from ClickHouse:")
    click.echo(gpu_hours_table(rows))
    click.echo()
    measured = {(f, d, p, c): s for f, d, p, c, s, _ in rows}
    truth = fleet.ground_truth(tz)
    problems = _compare(measured, truth)
    if problems:
        for line in problems[:20]:
            click.echo(f"  MISMATCH {line}", err=True)
        raise DemoMismatch(
            f"{len(problems)} of {len(truth)} (firm, day, provider, class) totals differ "
            "from the simulator's ground truth"
        )
    total = sum(truth.values())
    step(
        f"CHECK PASSED: all {len(truth)} (firm, day, provider, class) totals equal the simulator's "
        f"ground truth exactly ({hours_text(total)} GPU-hours, {total} GPU-seconds)"
    )
    _check_coverage(client, settings.clickhouse_database, start, nxt, len(fleet.gpus), total, step)
    click.echo()
    run_billing(work, client, settings.clickhouse_database, month, step)
    click.echo(f"stores, statements and logs: {work}")
    click.echo(query_hint(work, settings.clickhouse_database, month))


def query_hint(work: Path, database: str, month: str) -> str:
    """How to look at what the demo built with the ordinary commands, and where its inputs are."""
    env = " ".join(
        f"{name}={shlex.quote(value)}"
        for name, value in (
            ("GPUMETER_CLICKHOUSE_DSN", f"chdb://{(work / 'clickhouse').resolve()}"),
            ("GPUMETER_CLICKHOUSE_DATABASE", database),
            ("GPUMETER_BILLING_DB", f"sqlite:///{(work / 'billing.sqlite3').resolve()}"),
        )
    )
    inputs = work / "billing-inputs"
    last_day = calendar.monthrange(*(int(x) for x in month.split("-")))[1]
    return "\n".join([
        "",
        "Query what it built (the demo's stores, not your GPUMETER_HOME's): set",
        f"  export {env}",
        "then, for example:",
        f"  gpumeter usage summary --from {month}-01 --to {month}-{last_day}",
        f"  gpumeter billing invoices --month {month}",
        f"  gpumeter billing export --month {month}",
        f"  gpumeter billing reconcile --month {month}",
        f"Example input files: {inputs}/ (rates.toml, programs.toml, vouchers.csv, firms.csv) and {work / 'fleet.csv'}",
    ])  # fmt: skip


def _check_coverage(
    client: Any, db: str, start: datetime, end: datetime, gpus: int, sold: int, step: Callable[[str], None]
) -> None:
    """Every second of every GPU's month in a GPU window, adding up, and what they say was held is
    exactly the usage billed (``pipeline coverage``)."""
    store = UsageStore(client, db)
    rows = store.coverage(start, end)
    text, problems = coverage_table(rows, store.uncovered(start, end))
    capacity, held = sum(int(r[5]) for r in rows), sum(int(r[6]) + int(r[7]) for r in rows)
    expected = gpus * (int(end.timestamp()) - int(start.timestamp()))  # real seconds, a DST change too
    if problems or capacity != expected or held != sold:
        click.echo(text, err=True)
        raise DemoMismatch(
            f"GPU windows: {capacity} s of capacity (expected {expected}), {held} s held (billed {sold}), "
            f"{problems} problem(s)"
        )
    idle, unobserved = sum(int(r[8]) for r in rows), sum(int(r[9]) + int(r[10]) for r in rows)
    step(
        f"CHECK PASSED: every second of the {gpus} GPUs' month accounted in {sum(int(r[4]) for r in rows)} GPU "
        f"windows: {hours_text(capacity)} h = {hours_text(held)} h sold + {hours_text(idle)} h idle + "
        f"{hours_text(unobserved)} h unobserved (gpumeter pipeline coverage)"
    )


def _compare(measured: dict[TruthKey, int], truth: dict[TruthKey, int]) -> list[str]:
    out = []
    for key in sorted(set(measured) | set(truth), key=str):
        m, t = measured.get(key, 0), truth.get(key, 0)
        if m != t:
            out.append(f"{key}: ClickHouse {m} s, ground truth {t} s")
    return out
