"""A registered host that lies, through the real broker, loader and ClickHouse: every finding of the
usage-checks issue sent beside an honest hour of usage. The honest hour bills exactly; the bad
window is held (or quarantined) with its reason; the loader keeps running; reconcile balances.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

import pytest
from billing_helpers import Cli, amounts
from kafka import KafkaProducer

from gpumeter.fleet import FLEET_COLUMNS
from gpumeter.record import encode_batch, record_id, signature_headers
from pipeline.keys import parse_registry
from pipeline.loader import Loader, make_consumer
from pipeline.usage_store import HoldRow, UsageStore

pytestmark = pytest.mark.integration

T0 = int(datetime(2026, 3, 2, tzinfo=UTC).timestamp() * 1000)
MIN = 60_000
PROVIDER = {"P01-H01": "P01", "P01-H02": "P01", "P02-H01": "P02"}
FLEET = [
    "P01,P01-H01,GPU-A,H100-80G,60,2000-01-01T00:00:00Z,,",
    "P01,P01-H02,GPU-B,H100-80G,60,2000-01-01T00:00:00Z,,",
    "P02,P02-H01,GPU-C,Ascend-910B,60,2000-01-01T00:00:00Z,,",
    "P01,P01-H02,GPU-D,H100-80G,60,2026-03-10T00:00:00Z,,",  # installed on 10 March
]
RATES = """currency = "CNY"
timezone = "UTC"

[[rate]]
gpu_class = "H100-80G"
provider = "*"
price_per_gpu_hour = "10.00"
effective_from = 2000-01-01

[[rate]]
gpu_class = "Ascend-910B"
provider = "*"
price_per_gpu_hour = "6.00"
effective_from = 2000-01-01
"""
PROGRAMS = """[[program]]
id = "CITY-2026"
year = 2026
category = "compute"
budget = "1000000.00"
firm_cap = "1000.00"

[program.auto_grant]
face_value = "100.00"
subsidy_rate = "0.50"
"""
FIRMS = "firm_id,name,payment_terms_days\nF0001,One,30\nF0002,Two,30\n"


def window(host: str, gpu: str, firm: str, start: int, seconds: int = 60, length: int = MIN,
           cls: str = "H100-80G", **changes: Any) -> dict[str, Any]:  # fmt: skip
    w: dict[str, Any] = {
        "record_id": record_id(host, gpu, firm, start), "seq": 0, "provider_id": PROVIDER[host], "host_id": host,
        "gpu_uuid": gpu, "gpu_class": cls, "firm_id": firm, "window_start": start, "window_end": start + length,
        "allocated_seconds": seconds, "busy_seconds": None, "energy_joules": None, "signature": None,
    }  # fmt: skip
    w.update(changes)
    return w


HONEST = [window("P01-H01", "GPU-A", "F0001", T0 + i * MIN) for i in range(60)]  # one GPU-hour: 10.00 CNY


class World:
    def __init__(self, cli: Cli, ch: tuple[Any, str], bootstrap: str, topic: str) -> None:
        self.cli, self.ch, self.bootstrap, self.topic = cli, ch, bootstrap, topic
        cli.register_usage = False  # this test says what the fleet and the firms are
        self.secrets = {h: secrets.token_bytes(32) for h in PROVIDER}
        self.keys = parse_registry(
            {"hosts": {h: {"provider_id": p, "keys": {f"k-{h}": self.secrets[h].hex()}} for h, p in PROVIDER.items()}}
        )
        self.seq = 0

    def setup(self, fleet: list[str] = FLEET, firms: str = FIRMS) -> None:
        cli = self.cli
        cli.ok("fleet", "load", cli.file("fleet.csv", "\n".join([",".join(FLEET_COLUMNS), *fleet]) + "\n"))
        cli.ok("billing", "load", "--ratecard", cli.file("rates.toml", RATES),
               "--programs", cli.file("programs.toml", PROGRAMS), "--firms", cli.file("firms.csv", firms))  # fmt: skip

    def send(self, windows: list[dict[str, Any]], timestamp_ms: int | None = None) -> Loader:
        """Each host's windows as signed batches of at most 100, then the loader until all are read."""
        producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
        sent = 0
        by_host: dict[str, list[dict[str, Any]]] = {}
        for w in windows:
            self.seq += 1
            by_host.setdefault(w["host_id"], []).append({**w, "seq": self.seq})
        for host, ws in by_host.items():
            for i in range(0, len(ws), 100):
                value = encode_batch(host, "test", ws[i : i + 100])
                headers = signature_headers(value, f"k-{host}", self.secrets[host])
                producer.send(self.topic, key=host.encode(), value=value, headers=headers, timestamp_ms=timestamp_ms)
                sent += 1
        producer.flush()
        producer.close()
        client, db = self.ch
        consumer = make_consumer(self.bootstrap, self.topic, "g-checks", fast_rebalance=True)
        loader = Loader(consumer, client, db, self.topic, keys=self.keys)
        try:  # the group's committed offsets: each send reads only its own messages
            loader.run(until=lambda s: s.messages >= sent, idle_timeout_s=30)
        finally:
            consumer.close(autocommit=False)
        return loader

    def settle(self, month: str = "2026-03") -> str:
        return self.cli.ok("billing", "settle", "--month", month).out

    def billed(self, month: str = "2026-03") -> dict[str, tuple[str, str, str]]:
        return amounts(self.cli.ok("billing", "export", "--month", month).json())

    def held(self) -> dict[str, int]:
        """reason -> records held, from `billing holds`."""
        out = self.cli.ok("billing", "holds", "--examples", "0").out
        if out.startswith("no usage is held"):
            return {}
        return {line.split()[0]: int(line.split()[1]) for line in out.splitlines()[2:] if line.strip()}

    def quarantined(self) -> list[str]:
        client, db = self.ch
        result = client.query(f"SELECT reason FROM {db}.usage_quarantine ORDER BY reason")
        return [str(r[0]) for r in result.result_rows]

    def reconciled(self, month: str = "2026-03") -> str:
        return self.cli.ok("billing", "reconcile", "--month", month).out


@pytest.fixture
def world(cli: Cli, ch: tuple[Any, str], kafka_bootstrap: str, topic: str) -> World:
    w = World(cli, ch, kafka_bootstrap, topic)
    w.setup()
    return w


LIES = [
    # (name, bad windows, held reason -> records, quarantine reasons)
    ("alloc_4e9", [window("P01-H02", "GPU-B", "F0002", T0, seconds=4 * 10**9, length=4 * 10**12)], {},
     ["window_end more than 300 s after the loader's clock"]),
    ("one_hour_window", [window("P01-H02", "GPU-B", "F0002", T0, seconds=3600, length=3600_000)],
     {"window_length": 1}, []),
    ("starts_at_30s", [window("P01-H01", "GPU-A", "F0002", T0 + 30_000)], {"misaligned": 1}, []),
    ("29_days", [window("P01-H02", "GPU-B", "F0002", T0, seconds=60, length=29 * 86_400_000)], {},
     ["window longer than a day"]),
    ("two_firms_one_minute", [window("P01-H02", "GPU-B", "F0001", T0), window("P01-H02", "GPU-B", "F0002", T0)],
     {"oversubscribed": 2}, []),
    ("another_hosts_gpu", [window("P02-H01", "GPU-A", "F0002", T0)], {"other_host": 1}, []),
    ("unregistered_gpu", [window("P01-H02", "GPU-Z", "F0002", T0)], {"unregistered": 1}, []),
    ("before_its_registration", [window("P01-H02", "GPU-D", "F0002", T0)], {"unregistered": 1}, []),
    ("500_overlapping", [window("P01-H02", "GPU-B", "F0002", T0 + i * 1000) for i in range(1, 501) if i % 60],
     {"misaligned": 492}, []),
    ("50_unknown_firms", [window("P01-H02", "GPU-B", f"F9{n:03d}", T0 + n * MIN) for n in range(50)],
     {"unknown_firm": 50}, []),
    ("dated_2001", [window("P01-H02", "GPU-B", "F0002", int(datetime(2001, 1, 1, tzinfo=UTC).timestamp() * 1000))],
     {"too_old": 1}, []),
]  # fmt: skip


@pytest.mark.parametrize(("bad", "held", "quarantined"), [c[1:] for c in LIES], ids=[c[0] for c in LIES])
def test_a_lie_beside_an_honest_hour_is_held_and_the_hour_bills_exactly(
    world: World, bad: list[dict[str, Any]], held: dict[str, int], quarantined: list[str]
) -> None:
    loader = world.send(HONEST + bad)
    assert loader.stats.windows == len(HONEST) + len(bad) - len(quarantined)  # the loader kept going
    assert world.quarantined() == quarantined
    out = world.settle()
    assert world.billed() == {"F0001": ("10.00", "5.00", "5.00")}  # the honest hour; half from the auto voucher
    assert world.held() == held
    for reason, n in held.items():
        assert f"{reason} " in out and f" {n} records" in out
    assert "reconciled 2026-03: OK" in world.reconciled()


def test_a_record_sent_again_with_other_seconds_claims_each_version(world: World) -> None:
    """A re-delivery with the same allocated seconds claims its GPU's window once, whatever else changed;
    one with other seconds claims both versions: 30 s then 40 s of one minute is 70 s in 60 s, held."""
    world.send([*HONEST, *(window("P01-H02", "GPU-B", "F0002", T0 + i * MIN, seconds=30) for i in range(2))])
    world.send([
        window("P01-H02", "GPU-B", "F0002", T0, seconds=40),
        window("P01-H02", "GPU-B", "F0002", T0 + MIN, seconds=30, busy_seconds=12.5),
    ])  # fmt: skip
    out = world.settle()
    assert "different content (first delivery billed, later ones not): 2:" in out
    assert world.held() == {"oversubscribed": 1}
    assert world.billed() == {
        "F0001": ("10.00", "5.00", "5.00"),  # the honest hour
        "F0002": ("0.08", "0.04", "0.04"),  # 30 s of the second minute at 10.00 an hour
    }
    assert "reconciled 2026-03: OK" in world.reconciled()


def test_a_host_the_registry_gives_another_provider_is_held(world: World) -> None:
    """The keys file binds P01-H02 to P01 (so its signed records say P01); the registry says its GPU's
    host belongs to P02. Which is true is for staff to find out: the record is held, not billed."""
    world.setup(fleet=[FLEET[0], "P02,P01-H02,GPU-B,H100-80G,60,2000-01-01T00:00:00Z,,"])
    world.send([*HONEST, window("P01-H02", "GPU-B", "F0002", T0)])
    world.settle()
    assert world.billed() == {"F0001": ("10.00", "5.00", "5.00")}
    assert world.held() == {"other_provider": 1}
    assert "reconciled 2026-03: OK" in world.reconciled()


def test_a_released_record_whose_gpu_leaves_the_registry_is_held_again(world: World) -> None:
    """A release answers the hold it was given for; it never stands in for a registration. Released
    from `other_host`, then its GPU leaves the registry: held `unregistered` (the hold's reason is
    the latest judgment's), not billed in the class the record states."""
    world.send([*HONEST, window("P02-H01", "GPU-A", "F0002", T0 + 100 * MIN, cls="Ascend-910B")])
    world.settle("2026-03")
    assert world.billed("2026-03") == {"F0001": ("10.00", "5.00", "5.00")}
    assert world.held() == {"other_host": 1}
    world.cli.ok("billing", "release", "--reason", "other_host", "--why", "the GPU moved that day")
    world.setup(fleet=FLEET[1:])  # GPU-A is no longer registered
    world.settle("2026-04")
    assert world.held() == {"unregistered": 1}
    assert world.billed("2026-04") == {}


def test_the_price_class_is_the_registrys_not_the_records(world: World) -> None:
    world.send([*HONEST, *(window("P01-H02", "GPU-B", "F0002", T0 + i * MIN, cls="Ascend-910B") for i in range(60))])
    world.settle()
    assert world.billed() == {"F0001": ("10.00", "5.00", "5.00"), "F0002": ("10.00", "5.00", "5.00")}  # H100, not 6.00


def test_a_registered_class_without_a_price_refuses_the_settlement_with_nothing_written(world: World) -> None:
    world.setup(fleet=[*FLEET[:2], "P02,P02-H01,GPU-C,B200,60,2000-01-01T00:00:00Z,,"])
    world.send([*HONEST, window("P02-H01", "GPU-C", "F0002", T0, cls="Ascend-910B")])
    r = world.cli("billing", "settle", "--month", "2026-03")
    assert r.code == 1 and "no price for 1 usage key(s): (provider=P02, gpu_class=B200" in r.err
    assert world.cli("billing", "export", "--month", "2026-03").code == 1


def test_the_hold_lifecycle_fix_release_exclude_and_every_second_accounted(world: World) -> None:
    world.send([
        *HONEST,
        *(window("P01-H02", "GPU-B", "F0003", T0 + i * MIN) for i in range(30)),  # a firm not loaded yet
        window("P01-H02", "GPU-Y", "F0002", T0),  # a GPU registered late
        window("P01-H02", "GPU-B", "F0001", T0 + 100 * MIN, seconds=40),  # two claims on one minute:
        window("P01-H02", "GPU-B", "F0002", T0 + 100 * MIN, seconds=30),  # 70 s in 60 s
        window("P01-H02", "GPU-B", "F0001", T0 + 200 * MIN + 30_000, seconds=20),  # off the host's grid
    ])  # fmt: skip
    world.settle("2026-03")
    assert world.billed("2026-03") == {"F0001": ("10.00", "5.00", "5.00")}
    assert world.held() == {"misaligned": 1, "oversubscribed": 2, "unknown_firm": 30, "unregistered": 1}
    assert "reconciled 2026-03: OK" in world.reconciled()
    p01 = world.cli.ok("billing", "provider-statement", "--provider", "P01", "--month", "2026-03", "--format", "csv")
    assert p01.out.strip().split("\n\n")[2].splitlines() == [  # per GPU: billed and held, with reasons
        "host_id,gpu_uuid,gpu_hours_billed,held,excluded,pending,held_why",
        "P01-H01,GPU-A,1.000000,0.000000,0.000000,0.000000,",
        "P01-H02,GPU-B,0.000000,0.525000,0.000000,0.000000,misaligned 0.005556; oversubscribed 0.019444; "
        "unknown_firm 0.500000",
        "P01-H02,GPU-Y,0.000000,0.016667,0.000000,0.000000,unregistered 0.016667",
    ]

    # staff: load the firm and register the GPU (a release cannot stand in for either), exclude the wrong claim
    for reason in ("oversubscribed", "unregistered"):
        r = world.cli("billing", "release", "--reason", reason, "--why", "try")
        assert r.code == 1 and "cannot be released" in r.err  # nothing recorded
    world.setup(
        fleet=[*FLEET, "P01,P01-H02,GPU-Y,H100-80G,60,2026-03-01T00:00:00Z,,"], firms=FIRMS + "F0003,Three,30\n"
    )
    out = world.cli.ok("billing", "release", "--reason", "misaligned", "--why", "agent ran 30 s late that day",
                       "--by", "auditor").out  # fmt: skip
    assert "1 held record(s) released" in out and "recorded as auditor: agent ran 30 s late that day" in out
    wrong = record_id("P01-H02", "GPU-B", "F0002", T0 + 100 * MIN)
    world.cli.ok("billing", "exclude", "--record", wrong, "--why", "F0002 had no job then")
    r = world.cli("billing", "exclude", "--record", "0" * 32, "--why", "x")
    assert r.code == 1 and "not held now" in r.err

    out = world.settle("2026-04")  # the released, the known firm's, the no longer oversubscribed: late usage
    assert "records held before that bill now, as late usage: 33" in out
    april = world.cli.ok("billing", "export", "--month", "2026-04").json()
    late = {(i["firm_id"], ln["adjustment_for"], ln["gpu_hours"]) for i in april["invoices"] for ln in i["lines"]}
    assert late == {
        ("F0003", "2026-03", "0.500000"),
        ("F0002", "2026-03", "0.016667"),
        ("F0001", "2026-03", "0.016667"),  # 40 s of the no longer oversubscribed minute, 20 s released
    }
    assert world.held() == {}
    text = world.reconciled("2026-03")
    assert "reconciled 2026-03: OK" in text
    f2 = next(line.split() for line in text.splitlines() if line.startswith("F0002"))
    # 90 s of March: 60 s released and billed on April's adjustment lines, 30 s excluded, nothing unbilled
    assert f2[1:] == ["0.025000", "0.000000", "0.016667", "0.000000", "0.008333", "0.000000", "0.000000"]


def test_a_far_future_window_cannot_pass_on_the_producer_timestamp(world: World) -> None:
    far = T0 + 400 * 86_400_000
    world.send([*HONEST, window("P01-H02", "GPU-B", "F0002", far)], timestamp_ms=far + 10 * MIN)
    assert world.quarantined() == ["window_end more than 300 s after the loader's clock"]


def test_hold_rows_of_a_settlement_that_never_committed_are_discarded(world: World) -> None:
    """A settlement writes its hold rows to ClickHouse before its billing transaction commits. Rows of
    an attempt that died after that must not count: here, April's first attempt 'held' a March record
    that March had already billed; kept, May would bill it a second time."""
    client, db = world.ch
    world.send(HONEST)
    world.settle("2026-03")
    orphan = HoldRow(HONEST[0]["record_id"], "held", "unregistered", "F0001", "P01", "P01-H01", "GPU-A",
                     "H100-80G", datetime.fromtimestamp(T0 / 1000, UTC), 60)  # fmt: skip
    UsageStore(client, db).record_holds(_store_id(world), 2, "2026-04", [orphan])  # April's attempt, then it died
    world.settle("2026-04")  # the retry
    world.settle("2026-05")
    for month in ("2026-04", "2026-05"):
        assert world.billed(month) == {}
    assert world.held() == {}
    assert "reconciled 2026-03: OK" in world.reconciled()


def _store_id(world: World) -> str:
    from billing.adapters import state
    from billing.adapters.store import Store

    with Store(f"sqlite:///{world.cli.tmp / 'home' / 'billing.sqlite3'}").transaction() as tx:
        return state.store_id(tx)
