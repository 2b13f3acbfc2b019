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
from typing import Any, TypeVar

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
from gpumeter.inputfiles import InputFileError, refuse

T = TypeVar("T")


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
    given = [(o, f) for o, f in (("--ratecard", ratecard), ("--programs", programs), ("--vouchers", vouchers),
                                 ("--firms", firms)) if f is not None]  # fmt: skip
    for i, (option, path) in enumerate(given):
        twice = [o for o, f in given[:i] if f.resolve() == path.resolve()]
        if twice:
            raise InputFileError(path, [(0, f"given as both {twice[0]} and {option}: each option takes its own file")])
    # 1. read everything; every problem of every file is reported at once and nothing is written
    problems: dict[Path, list[tuple[int, str]]] = {}
    rc = _read(problems, ratecard, read_rate_card)
    progs = _read(problems, programs, read_programs) or []
    vouchs = _read(problems, vouchers, read_vouchers) or []
    fs = _read(problems, firms, read_firms) or []
    report = LoadReport()
    # 2. check the good rows against what is stored, then write, in one transaction
    with store.transaction() as tx:
        tx.lock_for_settlement()
        settled = state.settlements(tx)
        if rc is not None and ratecard is not None:
            problems[ratecard] += _rate_problems(tx, rc, settled)
        replaced = {v.voucher_id for _, v in vouchs}
        if programs is not None:
            problems[programs] += _program_problems(tx, progs, replaced)
        if vouchers is not None:
            known_firms = set(state.firms(tx)) | {f.firm_id for _, f in fs}
            all_programs = state.programs(tx) | {p.program_id: p for _, p in progs}
            refused = [o for o, f in given if o in ("--programs", "--firms") and problems.get(f)]
            problems[vouchers] += _voucher_problems(tx, vouchs, all_programs, known_firms, refused)
        refuse(problems)
        if rc is not None:
            _write_rates(tx, rc, now, report)
        for _, p in progs:
            _upsert(report, "programs", state.programs(tx).get(p.program_id), p, partial(state.put_program, tx, p))
        stored_vouchers = state.vouchers(tx)
        for _, v in vouchs:
            _upsert(report, "vouchers", stored_vouchers.get(v.voucher_id), v, partial(state.put_voucher, tx, v))
        stored_firms = state.firms(tx)
        for _, firm in fs:
            _upsert(report, "firms", stored_firms.get(firm.firm_id), firm, partial(state.put_firm, tx, firm))
    return report


def _read(
    problems: dict[Path, list[tuple[int, str]]], path: Path | None, reader: Callable[[Path], tuple[T, Any]]
) -> T | None:
    """``reader(path)``'s rows, its problems kept under the path (a file that cannot be read at all: none)."""
    if path is None:
        return None
    try:
        rows, found = reader(path)
    except InputFileError as exc:
        problems[path] = list(exc.problems)
        return None
    problems[path] = list(found)
    return rows


def _upsert(report: LoadReport, kind: str, old: object, new: object, write: Callable[[], None]) -> None:
    if old == new:
        report.count(kind, "unchanged")
        return
    report.count(kind, "new" if old is None else "changed")
    write()


def _rate_problems(tx: Tx, rc: RateCardFile, settled: list[state.SettlementRow]) -> list[tuple[int, str]]:
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
    return problems


def _write_rates(tx: Tx, rc: RateCardFile, now: datetime, report: LoadReport) -> None:
    state.set_meta(tx, "timezone", rc.timezone)
    state.set_meta(tx, "currency", rc.currency)
    if rc.usage_horizon_days is not None:
        state.set_meta(tx, "usage_horizon_days", str(rc.usage_horizon_days))
    stored = {(r.gpu_class, r.provider, r.effective_from): r for r in state.rates(tx)}
    for rate in rc.rates:
        old = stored.get((rate.gpu_class, rate.provider, rate.effective_from))
        _upsert(report, "rates", old, rate, partial(state.put_rate, tx, rate, now))


def _program_problems(tx: Tx, progs: list[tuple[int, Program]], replaced: set[str]) -> list[tuple[int, str]]:
    """Rules 6.3 and 6.4: a program with paid credits keeps its year and category; a new year must
    still hold the validity of its stored vouchers (those this load does not replace)."""
    stored = state.programs(tx)
    used = state.credited_programs(tx)
    vouchers = state.vouchers(tx)
    problems = []
    for line, p in progs:
        old = stored.get(p.program_id)
        if old is not None and p.program_id in used and (old.year, old.category) != (p.year, p.category):
            problems.append((line, f"program {p.program_id} has paid credits; its year and category cannot change"))
        elif old is not None and old.year != p.year:
            outside = sorted(
                v.voucher_id for v in vouchers.values()
                if v.program_id == p.program_id and v.voucher_id not in replaced
                and not v.valid_from.year == v.valid_until.year == p.year
            )  # fmt: skip
            if outside:
                names = ", ".join(outside[:5])
                problems.append((line, f"program {p.program_id}: year {p.year} would leave its voucher(s) {names} "
                                       "valid outside it; load their new dates with it"))  # fmt: skip
    return problems


def _voucher_problems(
    tx: Tx, vouchs: list[tuple[int, Voucher]], programs: dict[str, Program], firms: set[str], refused: list[str]
) -> list[tuple[int, str]]:
    """Rules 6.3 and 6.4: a voucher needs its program and its firm (stored, or loaded with it), lies
    within its program's year, and cannot change once it paid credits. A row equal to the stored
    voucher is not judged again (it was loaded under older rules; a voucher with credits cannot
    change). ``refused``: the options whose files were refused, so a missing id may be theirs."""
    stored = state.vouchers(tx)
    used = state.credited_vouchers(tx)
    problems = []
    for line, v in vouchs:
        old = stored.get(v.voucher_id)
        if old == v:
            continue
        program = programs.get(v.program_id)
        if program is None:
            why = " (its --programs file was refused above)" if "--programs" in refused else ""
            problems.append((line, f"voucher {v.voucher_id}: program {v.program_id} is not loaded{why}"))
        elif not (v.valid_from.year == v.valid_until.year == program.year):
            problems.append(
                (
                    line,
                    f"voucher {v.voucher_id}: valid {v.valid_from} to {v.valid_until}, outside its program "
                    f"{v.program_id}'s year {program.year} (a voucher pays only for usage in its program's year)",
                )
            )
        if v.firm_id not in firms:
            why = "its --firms file was refused above" if "--firms" in refused else "load it with --firms"
            problems.append((line, f"voucher {v.voucher_id}: firm {v.firm_id} is not loaded ({why})"))
        if old is not None and v.voucher_id in used:
            problems.append((line, f"voucher {v.voucher_id} has paid credits; it cannot change"))
    return problems
