"""The billing store on SQLite and on a real, throwaway PostgreSQL server.

PostgreSQL tests start their own server (initdb + pg_ctl from Debian's
postgresql package, as the unprivileged ``postgres`` user when run as root) and
are skipped, saying why, where the server binaries are absent.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from billing.adapters import state
from billing.adapters.files import RateCardFile
from billing.adapters.store import Store
from billing.app.load import LoadReport
from billing.app.load import _write_rates as write_rates
from billing.app.ports import CheckContext, SettlementSpan, SpanUsage
from billing.app.settle import NotReadyError, SettlementResult, settle_month
from billing.core.model import Rate, UsageAggregate
from billing.core.pricing import UnpricedUsageError
from gpumeter.demo.broker import free_port

pytestmark = pytest.mark.integration


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    external = os.environ.get("GPUMETER_TEST_POSTGRES_URL")
    if external:
        yield external
        return
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="gm-pg-"))
    data = root / "data"
    port = free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)  # fmt: skip
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-w", "-l", str(root / "log"),
                    "start"], check=True, capture_output=True)  # fmt: skip
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    import psycopg

    name = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield postgres_server.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'billing.sqlite3'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


class FixedUsage:
    """A usage reader with fixed groups (this file tests the store, not ClickHouse). With ``inside``,
    the read waits at that barrier and then for ``release``: the settlement is held mid-transaction."""

    def __init__(
        self,
        groups: list[UsageAggregate],
        inside: threading.Barrier | None = None,
        release: threading.Event | None = None,
    ) -> None:
        self._groups = groups
        self.inside = inside
        self.release = release

    def usage(self, tz: str, span: SettlementSpan) -> SpanUsage:
        if self.inside is not None and self.release is not None:
            self.inside.wait(10)
            assert self.release.wait(10)
        return SpanUsage([g for g in self._groups if g.day <= span.last_day])

    def checked_usage(self, tz: str, span: SettlementSpan, context: CheckContext) -> SpanUsage:
        return self.usage(tz, span)  # a fixed, already checked month: nothing held

    def record_holds(self, store_id: str, seq: int, month: str) -> None:
        pass

    def discard_holds_after(self, store_id: str, settled_seq: int) -> None:
        pass

    def months_before(
        self, tz: str, first_day: date, cutoff: datetime, context: CheckContext | None = None
    ) -> list[str]:
        return []

    def conflicting_records(self, span: SettlementSpan, limit: int = 20) -> tuple[int, list[str]]:
        return 0, []


def _load_rates(store: Store) -> None:
    card = RateCardFile("CNY", "UTC", (Rate("H100", "*", Decimal("10"), date(2026, 1, 1)),), {})
    with store.transaction() as tx:
        write_rates(tx, card, datetime.now(UTC), LoadReport())


GROUPS = [
    UsageAggregate("F1", date(2026, 3, 1), "P1", "H100", 3600, 1, 0, 0),
    UsageAggregate("F2", date(2026, 3, 2), "P1", "H100", 5400, 2, 0, 0),
]


def test_settlement_round_trips_through_the_store(store_url: str) -> None:
    store = Store(store_url)
    _load_rates(store)
    result = settle_month(store, FixedUsage(GROUPS), "2026-03")
    again = settle_month(Store(store_url), FixedUsage(GROUPS), "2026-03")
    assert not result.already_settled and again.already_settled
    assert [(i.firm_id, str(i.gross)) for i in result.invoices] == [("F1", "10.00"), ("F2", "15.00")]
    assert again.invoices == result.invoices


def test_a_month_settles_once_it_has_ended_in_the_billing_time_zone(store_url: str) -> None:
    """Shanghai is UTC+8: March ends there at 16:00 UTC on 31 March. A minute before, the settlement
    is refused and writes nothing; a minute after, it settles."""
    store = Store(store_url)
    card = RateCardFile("CNY", "Asia/Shanghai", (Rate("H100", "*", Decimal("10"), date(2026, 1, 1)),), {})
    with store.transaction() as tx:
        write_rates(tx, card, datetime.now(UTC), LoadReport())
    with pytest.raises(NotReadyError, match=r"it ends at 2026-04-01T00:00:00\+08:00, Asia/Shanghai"):
        settle_month(store, FixedUsage(GROUPS), "2026-03", clock=lambda: datetime(2026, 3, 31, 15, 59, tzinfo=UTC))
    with store.transaction() as tx:
        assert state.settlements(tx) == []
    done = settle_month(store, FixedUsage(GROUPS), "2026-03", clock=lambda: datetime(2026, 3, 31, 16, 1, tzinfo=UTC))
    assert not done.already_settled and len(done.invoices) == 2


def test_two_settlements_at_once_cannot_both_apply(store_url: str) -> None:
    """The second settlement starts while the first is inside its transaction (held there at a
    barrier), is still waiting for the lock half a second later, and then finds the month settled."""
    _load_rates(Store(store_url))
    inside, release = threading.Barrier(3), threading.Event()  # the first settlement, the second, this test
    results: list[SettlementResult] = []
    errors: list[BaseException] = []
    second_done = threading.Event()

    def first() -> None:
        try:
            results.append(settle_month(Store(store_url), FixedUsage(GROUPS, inside, release), "2026-03"))
        except BaseException as exc:
            errors.append(exc)

    def second() -> None:
        try:
            inside.wait(10)  # the first settlement holds the store's write lock now
            results.append(settle_month(Store(store_url), FixedUsage(GROUPS), "2026-03"))
        except BaseException as exc:
            errors.append(exc)
        finally:
            second_done.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    try:
        inside.wait(10)  # both are past the barrier: the first inside its transaction, the second starting
        assert not second_done.wait(0.5), "the second settlement did not wait for the first one's lock"
    finally:
        release.set()
        for t in threads:
            t.join(30)
    assert errors == []
    assert sorted(r.already_settled for r in results) == [False, True]  # one settled it, the other found it done
    with Store(store_url).transaction() as tx:
        assert [s.month for s in state.settlements(tx)] == ["2026-03"]
        assert len(tx.query("SELECT * FROM items")) == 2


def test_a_failed_settlement_leaves_nothing(store_url: str) -> None:
    store = Store(store_url)
    _load_rates(store)
    unpriced = [*GROUPS, UsageAggregate("F3", date(2026, 3, 3), "P1", "B200", 60, 1, 0, 0)]
    with pytest.raises(UnpricedUsageError, match="no price for 1 usage key"):
        settle_month(store, FixedUsage(unpriced), "2026-03")
    with store.transaction() as tx:
        counts: dict[str, Any] = {
            t: tx.query(f"SELECT count(*) FROM {t}")[0][0] for t in ("settlements", "items", "invoices")
        }
    assert counts == {"settlements": 0, "items": 0, "invoices": 0}
