"""``gpumeter billing load``: configuration files into the store, idempotently.

Every file is read and validated whole before anything is written; then all of
them go in one transaction. Loading the same files again changes nothing. Rows
are keyed by their ids (rates by gpu_class, provider and effective_from) and
upserted; nothing is deleted by leaving it out of a file.

History is fixed once settled (docs/billing-rules.md 6.4):
- the billing time zone and currency cannot change after the first settlement;
- a rate effective on or before the last settled month's last day cannot change
  its price (it priced closed invoices);
- a voucher that has paid credits cannot change at all;
- a program that has paid credits cannot change its year or category.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path

from billing.adapters import state
from billing.adapters.files import (
    RateCardFile,
    read_firms,
    read_programs,
    read_rate_card,
    read_vouchers,
)
from billing.adapters.store import Store, Tx
from billing.app.settle import last_day_of_month
from billing.core.invoicing import DEFAULT_CURRENCY
from billing.core.model import Program, Voucher
from gpumeter.inputfiles import InputFileError


@dataclass(slots=True)
class LoadReport:
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def count(self, kind: str, outcome: str) -> None:
        per_kind = self.counts.setdefault(kind, {"new": 0, "changed": 0, "unchanged": 0})
        per_kind[outcome] += 1

    def lines(self) -> list[str]:
        return [
            f"{kind}: {c['new']} new, {c['changed']} changed, {c['unchanged']} unchanged"
            for kind, c in self.counts.items()
        ]


def load_files(
    store: Store,
    now: datetime,
    ratecard: Path | None = None,
    programs: Path | None = None,
    vouchers: Path | None = None,
    firms: Path | None = None,
) -> LoadReport:
    # 1. read and validate everything first: a bad row anywhere refuses all of it
    rc = read_rate_card(ratecard) if ratecard else None
    progs = read_programs(programs) if programs else []
    vouchs = read_vouchers(vouchers) if vouchers else []
    fs = read_firms(firms) if firms else []
    report = LoadReport()
    # 2. check against what is stored, and write, in one transaction
    with store.transaction() as tx:
        tx.lock_for_settlement()
        settled = state.settlements(tx)
        if rc is not None and ratecard is not None:
            _load_rates(tx, ratecard, rc, settled, now, report)
        if programs is not None:
            _load_programs(tx, programs, progs, report)
        if vouchers is not None:
            _load_vouchers(tx, vouchers, vouchs, report)
        stored_firms = state.firms(tx)
        for _, firm in fs:
            _upsert(report, "firms", stored_firms.get(firm.firm_id), firm, partial(state.put_firm, tx, firm))
    return report


def _upsert(report: LoadReport, kind: str, old: object, new: object, write: Callable[[], None]) -> None:
    if old == new:
        report.count(kind, "unchanged")
        return
    report.count(kind, "new" if old is None else "changed")
    write()


def _load_rates(
    tx: Tx, path: Path, rc: RateCardFile, settled: list[state.SettlementRow], now: datetime, report: LoadReport
) -> None:
    problems: list[tuple[int, str]] = []
    if settled:
        tz = state.get_meta(tx, "timezone", state.DEFAULT_TIMEZONE)
        cur = state.get_meta(tx, "currency", DEFAULT_CURRENCY)
        if rc.timezone != tz:
            problems.append((1, f"timezone {rc.timezone} differs from {tz}, used by settled months; it cannot change"))
        if rc.currency != cur:
            problems.append((1, f"currency {rc.currency} differs from {cur}, used by settled months; it cannot change"))
    closed_until = last_day_of_month(settled[-1].month) if settled else None
    stored = {(r.gpu_class, r.provider, r.effective_from): r for r in state.rates(tx)}
    for rate in rc.rates:
        old = stored.get((rate.gpu_class, rate.provider, rate.effective_from))
        if old is not None and old != rate and closed_until is not None and rate.effective_from <= closed_until:
            problems.append(
                (
                    rc.lines.get((rate.gpu_class, rate.provider, rate.effective_from), 0),
                    f"rate {rate.gpu_class}/{rate.provider} effective {rate.effective_from} priced settled months; "
                    f"its price cannot change from {old.price_per_gpu_hour} to {rate.price_per_gpu_hour} "
                    "(add a rate with a later effective_from instead)",
                )
            )
    if problems:
        raise InputFileError(path, problems)
    state.set_meta(tx, "timezone", rc.timezone)
    state.set_meta(tx, "currency", rc.currency)
    if rc.usage_horizon_days is not None:
        state.set_meta(tx, "usage_horizon_days", str(rc.usage_horizon_days))
    for rate in rc.rates:
        old = stored.get((rate.gpu_class, rate.provider, rate.effective_from))
        _upsert(report, "rates", old, rate, partial(state.put_rate, tx, rate, now))


def _load_programs(tx: Tx, path: Path, progs: list[tuple[int, Program]], report: LoadReport) -> None:
    stored = state.programs(tx)
    used = state.credited_programs(tx)
    problems = []
    for line, p in progs:
        old = stored.get(p.program_id)
        if old is not None and p.program_id in used and (old.year, old.category) != (p.year, p.category):
            problems.append((line, f"program {p.program_id} has paid credits; its year and category cannot change"))
    if problems:
        raise InputFileError(path, problems)
    for _, p in progs:
        _upsert(report, "programs", stored.get(p.program_id), p, partial(state.put_program, tx, p))


def _load_vouchers(tx: Tx, path: Path, vouchs: list[tuple[int, Voucher]], report: LoadReport) -> None:
    stored = state.vouchers(tx)
    programs = state.programs(tx)
    used = state.credited_vouchers(tx)
    problems = []
    for line, v in vouchs:
        old = stored.get(v.voucher_id)
        if v.program_id not in programs:
            problems.append((line, f"voucher {v.voucher_id}: program {v.program_id} is not loaded"))
        elif old is not None and old != v and v.voucher_id in used:
            problems.append((line, f"voucher {v.voucher_id} has paid credits; it cannot change"))
    if problems:
        raise InputFileError(path, problems)
    for _, v in vouchs:
        _upsert(report, "vouchers", stored.get(v.voucher_id), v, partial(state.put_voucher, tx, v))
