"""Reading and writing billing objects in the store (one ``Tx`` at a time).

All of billing's SQL lives here (and the DDL in ``store.py``); the rules live in the pure core
and in the application (``billing.app``).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from fractions import Fraction
from operator import attrgetter

from billing.adapters.store import Tx
from billing.app.ports import HeldTotal
from billing.core.fastpath import cached_isoformat
from billing.core.invoicing import Invoice, InvoiceCredit, InvoiceLine
from billing.core.ledger import Payment
from billing.core.model import AutoGrant, ChargeItem, Credit, Firm, Program, Rate, Voucher
from billing.core.netting import NettingState
from billing.core.pricing import RateCard

DEFAULT_TIMEZONE = "UTC"


@dataclass(frozen=True, slots=True)
class SettlementRow:
    month: str
    seq: int
    usage_cutoff: datetime
    settled_at: datetime
    timezone: str
    currency: str
    items: int
    invoices: int
    records: int
    unattributed_seconds: int
    unattributed_records: int
    conflicting_records: int


# ---------------------------------------------------------------- meta


def get_meta(tx: Tx, key: str, default: str) -> str:
    row = tx.one("SELECT value FROM meta WHERE key = ?", (key,))
    return str(row[0]) if row else default


def set_meta(tx: Tx, key: str, value: str) -> None:
    tx.execute("DELETE FROM meta WHERE key = ?", (key,))
    tx.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))


def store_id(tx: Tx) -> str:
    """This billing store's identity, made on first use: hold records and decisions in ClickHouse
    carry it, so another store over the same usage never reads them as its own."""
    value = get_meta(tx, "store_id", "")
    if not value:
        value = uuid.uuid4().hex
        set_meta(tx, "store_id", value)
    return value


# ---------------------------------------------------------------- configuration


def rates(tx: Tx) -> list[Rate]:
    return [
        Rate(
            gpu_class=r[0],
            provider=r[1],
            effective_from=date.fromisoformat(r[2]),
            price_per_gpu_hour=Decimal(r[3]),
        )
        for r in tx.query("SELECT gpu_class, provider, effective_from, price_per_gpu_hour FROM rates")
    ]


def programs(tx: Tx) -> dict[str, Program]:
    out = {}
    for pid, year, category, budget, cap, face, rate in tx.query(
        "SELECT program_id, year, category, budget, firm_cap, auto_face_value, auto_subsidy_rate FROM programs"
    ):
        grant = AutoGrant(Decimal(face), Decimal(rate)) if face is not None else None
        out[pid] = Program(pid, int(year), category, Decimal(budget), Decimal(cap), grant)
    return out


def vouchers(tx: Tx) -> dict[str, Voucher]:
    return {
        r[0]: Voucher(
            voucher_id=r[0],
            program_id=r[1],
            firm_id=r[2],
            face_value=Decimal(r[3]),
            subsidy_rate=Decimal(r[4]),
            valid_from=date.fromisoformat(r[5]),
            valid_until=date.fromisoformat(r[6]),
            priority=int(r[7]),
        )
        for r in tx.query(
            "SELECT voucher_id, program_id, firm_id, face_value, subsidy_rate, valid_from, valid_until, priority "
            "FROM vouchers"
        )
    }


def firms(tx: Tx) -> dict[str, Firm]:
    return {r[0]: Firm(r[0], r[1], int(r[2])) for r in tx.query("SELECT firm_id, name, payment_terms_days FROM firms")}


def put_rate(tx: Tx, rate: Rate, now: datetime) -> None:
    tx.execute(
        "DELETE FROM rates WHERE gpu_class = ? AND provider = ? AND effective_from = ?",
        (rate.gpu_class, rate.provider, rate.effective_from.isoformat()),
    )
    tx.execute(
        "INSERT INTO rates (gpu_class, provider, effective_from, price_per_gpu_hour, loaded_at) VALUES (?, ?, ?, ?, ?)",
        (
            rate.gpu_class,
            rate.provider,
            rate.effective_from.isoformat(),
            str(rate.price_per_gpu_hour),
            now.isoformat(),
        ),
    )


def put_program(tx: Tx, p: Program) -> None:
    tx.execute("DELETE FROM programs WHERE program_id = ?", (p.program_id,))
    grant = p.auto_grant
    tx.execute(
        "INSERT INTO programs (program_id, year, category, budget, firm_cap, auto_face_value, auto_subsidy_rate) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            p.program_id,
            p.year,
            p.category,
            str(p.budget),
            str(p.firm_cap),
            str(grant.face_value) if grant else None,
            str(grant.subsidy_rate) if grant else None,
        ),
    )


def granted_by(tx: Tx) -> dict[str, str]:
    """voucher_id -> the month whose settlement granted it automatically (rule 3.4)."""
    return {
        str(v): str(m)
        for v, m in tx.query(
            "SELECT voucher_id, granted_by_settlement FROM vouchers WHERE granted_by_settlement IS NOT NULL"
        )
    }


def put_voucher(tx: Tx, v: Voucher, granted_by: str | None = None) -> None:
    tx.execute("DELETE FROM vouchers WHERE voucher_id = ?", (v.voucher_id,))
    tx.execute(
        "INSERT INTO vouchers (voucher_id, program_id, firm_id, face_value, subsidy_rate, valid_from, valid_until, "
        "priority, granted_by_settlement) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            v.voucher_id,
            v.program_id,
            v.firm_id,
            str(v.face_value),
            str(v.subsidy_rate),
            v.valid_from.isoformat(),
            v.valid_until.isoformat(),
            v.priority,
            granted_by,
        ),
    )


def put_firm(tx: Tx, f: Firm) -> None:
    tx.execute("DELETE FROM firms WHERE firm_id = ?", (f.firm_id,))
    tx.execute(
        "INSERT INTO firms (firm_id, name, payment_terms_days) VALUES (?, ?, ?)",
        (f.firm_id, f.name, f.payment_terms_days),
    )


# ---------------------------------------------------------------- settlements


def settlements(tx: Tx) -> list[SettlementRow]:
    return [
        SettlementRow(
            month=r[0],
            seq=int(r[1]),
            usage_cutoff=datetime.fromisoformat(r[2]),
            settled_at=datetime.fromisoformat(r[3]),
            timezone=r[4],
            currency=r[5],
            items=int(r[6]),
            invoices=int(r[7]),
            records=int(r[8]),
            unattributed_seconds=int(r[9]),
            unattributed_records=int(r[10]),
            conflicting_records=int(r[11]),
        )
        for r in tx.query(
            "SELECT month, seq, usage_cutoff, settled_at, timezone, currency, items, invoices, records, "
            "unattributed_seconds, unattributed_records, conflicting_records FROM settlements ORDER BY seq"
        )
    ]


def drawn_state(tx: Tx, through_month: str | None = None) -> NettingState:
    """What every earlier settlement drew, per voucher, per (firm, program), per program; with
    ``through_month``, only the settlements of that month and before (months settle in order)."""
    by_v: dict[str, Decimal] = defaultdict(Decimal)
    by_fp: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    by_p: dict[str, Decimal] = defaultdict(Decimal)
    where, params = ("", ()) if through_month is None else (" WHERE month <= ?", (through_month,))
    for voucher_id, firm_id, program_id, amount in tx.query(
        "SELECT voucher_id, firm_id, program_id, amount FROM credits" + where, params
    ):
        a = Decimal(amount)
        by_v[voucher_id] += a
        by_fp[(firm_id, program_id)] += a
        by_p[program_id] += a
    return NettingState(dict(by_v), dict(by_fp), dict(by_p))


def write_settlement(
    tx: Tx,
    row: SettlementRow,
    items: list[ChargeItem],
    credits: tuple[Credit, ...],
    granted: tuple[Voucher, ...],
    invoices: tuple[Invoice, ...],
    rate_card: RateCard,
) -> None:
    tx.execute(
        "INSERT INTO settlements (month, seq, usage_cutoff, settled_at, timezone, currency, items, invoices, "
        "records, unattributed_seconds, unattributed_records, conflicting_records) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            row.month,
            row.seq,
            row.usage_cutoff.isoformat(),
            row.settled_at.isoformat(),
            row.timezone,
            row.currency,
            row.items,
            row.invoices,
            row.records,
            row.unattributed_seconds,
            row.unattributed_records,
            row.conflicting_records,
        ),
    )
    # rows go in primary-key order (month, firm_id, day, ...) so the B-trees append: items come in
    # netting order (day, firm_id, ...), so a stable sort by firm gives key order
    iso = cached_isoformat()  # a settlement has few distinct dates
    item_rows = []
    for i in sorted(items, key=attrgetter("firm_id")):  # stable: each firm's items keep their order
        rate = rate_card.rate_for(i.provider_id, i.gpu_class, i.day)
        assert rate is not None  # priced items always have one
        item_rows.append(
            (
                row.month, i.firm_id, iso(i.day), i.provider_id, i.gpu_class, i.adjustment_for or "",
                i.allocated_seconds, i.record_count, i.busy_seconds, i.energy_joules, str(i.unit_price),
                str(i.amount), rate.provider, iso(rate.effective_from),
            )
        )  # fmt: skip
    tx.executemany(
        "INSERT INTO items (month, firm_id, day, provider_id, gpu_class, adjustment_for, allocated_seconds, "
        "record_count, busy_seconds, energy_joules, unit_price, amount, rate_provider, rate_effective_from) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        item_rows,
    )
    tx.executemany(
        "INSERT INTO credits (month, firm_id, day, provider_id, gpu_class, adjustment_for, voucher_id, program_id, "
        "amount) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                row.month,
                c.firm_id,
                iso(c.item.day),
                c.item.provider_id,
                c.item.gpu_class,
                c.item.adjustment_for or "",
                c.voucher_id,
                c.program_id,
                str(c.amount),
            )
            for c in sorted(credits, key=attrgetter("firm_id"))
        ],
    )
    for v in granted:
        put_voucher(tx, v, granted_by=row.month)
    # one executemany per table (not three per invoice): 10,000 invoices are 30,000 calls otherwise
    tx.executemany(
        "INSERT INTO invoices (invoice_id, firm_id, month, issue_date, due_date, currency, gross, credit_total, "
        "amount_due) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                inv.invoice_id,
                inv.firm_id,
                inv.month,
                inv.issue_date.isoformat(),
                inv.due_date.isoformat(),
                inv.currency,
                str(inv.gross),
                str(inv.credit_total),
                str(inv.amount_due),
            )
            for inv in invoices
        ],
    )
    tx.executemany(
        "INSERT INTO invoice_lines (invoice_id, line_no, provider_id, gpu_class, unit_price, allocated_seconds, "
        "record_count, amount, adjustment_for, busy_seconds, energy_joules, item_count) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                inv.invoice_id,
                n,
                ln.provider_id,
                ln.gpu_class,
                str(ln.unit_price),
                ln.allocated_seconds,
                ln.record_count,
                str(ln.amount),
                ln.adjustment_for,
                ln.busy_seconds,
                ln.energy_joules,
                ln.item_count,
            )
            for inv in invoices
            for n, ln in enumerate(inv.lines, start=1)
        ],
    )
    tx.executemany(
        "INSERT INTO invoice_credits (invoice_id, voucher_id, program_id, amount) VALUES (?, ?, ?, ?)",
        [(inv.invoice_id, c.voucher_id, c.program_id, str(c.amount)) for inv in invoices for c in inv.credits],
    )


def invoices(tx: Tx, month: str | None = None, firm_id: str | None = None) -> list[Invoice]:
    where, params = [], []
    if month is not None:
        where.append("month = ?")
        params.append(month)
    if firm_id is not None:
        where.append("firm_id = ?")
        params.append(firm_id)
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    heads = tx.query(
        "SELECT invoice_id, firm_id, month, issue_date, due_date, currency, gross, credit_total, amount_due "
        f"FROM invoices{clause} ORDER BY month, firm_id",
        params,
    )
    lines: dict[str, list[InvoiceLine]] = defaultdict(list)
    credits: dict[str, list[InvoiceCredit]] = defaultdict(list)
    # only the chosen invoices' lines and credits, selected by the same clause in the database
    chosen = f"invoice_id IN (SELECT invoice_id FROM invoices{clause})"
    for r in tx.query(
        "SELECT invoice_id, provider_id, gpu_class, unit_price, allocated_seconds, record_count, amount, "
        f"adjustment_for, busy_seconds, energy_joules, item_count FROM invoice_lines WHERE {chosen} "
        "ORDER BY invoice_id, line_no",
        params,
    ):
        seconds = int(r[4])
        lines[r[0]].append(
            InvoiceLine(
                provider_id=r[1],
                gpu_class=r[2],
                unit_price=Decimal(r[3]),
                gpu_hours=Fraction(seconds, 3600),
                amount=Decimal(r[6]),
                adjustment_for=r[7],
                allocated_seconds=seconds,
                record_count=int(r[5]),
                busy_seconds=int(r[8]),
                energy_joules=int(r[9]),
                item_count=int(r[10]),
            )
        )
    for r in tx.query(
        f"SELECT invoice_id, voucher_id, program_id, amount FROM invoice_credits WHERE {chosen} "
        "ORDER BY invoice_id, voucher_id",
        params,
    ):
        credits[r[0]].append(InvoiceCredit(r[1], r[2], Decimal(r[3])))
    return [
        Invoice(
            invoice_id=h[0],
            firm_id=h[1],
            month=h[2],
            issue_date=date.fromisoformat(h[3]),
            due_date=date.fromisoformat(h[4]),
            currency=h[5],
            lines=tuple(lines[h[0]]),
            credits=tuple(credits[h[0]]),
            gross=Decimal(h[6]),
            credit_total=Decimal(h[7]),
            amount_due=Decimal(h[8]),
        )
        for h in heads
    ]


# ---------------------------------------------------------------- payments


def payments(tx: Tx) -> list[Payment]:
    return [
        Payment(firm_id=r[0], amount=Decimal(r[2]), paid_on=date.fromisoformat(r[3]), reference=r[1])
        for r in tx.query("SELECT firm_id, reference, amount, paid_on FROM payments ORDER BY paid_on, reference")
    ]


def put_payment(tx: Tx, p: Payment, now: datetime) -> None:
    tx.execute(
        "INSERT INTO payments (firm_id, reference, amount, paid_on, recorded_at) VALUES (?, ?, ?, ?, ?)",
        (p.firm_id, p.reference, str(p.amount), p.paid_on.isoformat(), now.isoformat()),
    )


# ---------------------------------------------------------------- reads for reports and checks

ItemKeyText = tuple[str, str, str, str, str, str]  # (month, firm_id, day, provider_id, gpu_class, adjustment_for)


def invoiced_seconds_of_month(tx: Tx, month: str) -> tuple[dict[str, int], dict[str, int]]:
    """Per firm, the allocated seconds of ``month`` invoiced on its own lines, and on later
    settlements' adjustment lines."""
    own: dict[str, int] = defaultdict(int)
    later: dict[str, int] = defaultdict(int)
    for firm_id, seconds, adj in tx.query(
        "SELECT firm_id, allocated_seconds, adjustment_for FROM items WHERE (month = ? AND adjustment_for = '') "
        "OR adjustment_for = ?",
        (month, month),
    ):
        (later if adj else own)[firm_id] += int(seconds)
    return dict(own), dict(later)


def item_amounts(tx: Tx) -> dict[ItemKeyText, Decimal]:
    return {
        (r[0], r[1], r[2], r[3], r[4], r[5]): Decimal(r[6])
        for r in tx.query("SELECT month, firm_id, day, provider_id, gpu_class, adjustment_for, amount FROM items")
    }


def credited_per_item(tx: Tx) -> dict[ItemKeyText, Decimal]:
    credited: dict[ItemKeyText, Decimal] = defaultdict(Decimal)
    for r in tx.query("SELECT month, firm_id, day, provider_id, gpu_class, adjustment_for, amount FROM credits"):
        credited[(r[0], r[1], r[2], r[3], r[4], r[5])] += Decimal(r[6])
    return dict(credited)


def credited_programs(tx: Tx) -> set[str]:
    """Programs that have paid at least one credit."""
    return {str(r[0]) for r in tx.query("SELECT DISTINCT program_id FROM credits")}


def credited_vouchers(tx: Tx) -> set[str]:
    """Vouchers that have paid at least one credit."""
    return {str(r[0]) for r in tx.query("SELECT DISTINCT voucher_id FROM credits")}


def items_of(tx: Tx, month: str, firm_id: str) -> list[tuple[date, str, str, str | None, Decimal, int, int, int]]:
    """(day, provider_id, gpu_class, adjustment_for or None, unit_price, allocated, busy, energy) of
    every item ``month``'s settlement billed ``firm_id`` (late usage of closed months included)."""
    return [
        (date.fromisoformat(day), provider, cls, adj or None, Decimal(price), int(sec), int(busy), int(joules))
        for day, provider, cls, adj, price, sec, busy, joules in tx.query(
            "SELECT day, provider_id, gpu_class, adjustment_for, unit_price, allocated_seconds, busy_seconds, "
            "energy_joules FROM items WHERE month = ? AND firm_id = ? ORDER BY day, provider_id, gpu_class",
            (month, firm_id),
        )
    ]


def billed_by_class(tx: Tx, provider_id: str, month: str) -> dict[str, tuple[int, Decimal]]:
    """gpu_class -> (allocated seconds, amount) of ``provider_id``'s items dated in ``month``: the
    month's own items and later adjustment items for it."""
    billed: dict[str, tuple[int, Decimal]] = {}
    for cls, seconds, amount in tx.query(
        "SELECT gpu_class, allocated_seconds, amount FROM items WHERE provider_id = ? AND "
        "((month = ? AND adjustment_for = '') OR adjustment_for = ?)",
        (provider_id, month, month),
    ):
        old = billed.get(cls, (0, Decimal(0)))
        billed[cls] = (old[0] + int(seconds), old[1] + Decimal(amount))
    return billed


# ---------------------------------------------------------------- holds


def write_settlement_holds(
    tx: Tx, month: str, fleet_version: int, held: Sequence[HeldTotal], released_records: int
) -> None:
    """What one settlement held (per reason, firm, day, provider, class) and what it checked against."""
    tx.execute(
        "INSERT INTO settlement_checks (month, fleet_version, held_seconds, held_records, released_records) "
        "VALUES (?, ?, ?, ?, ?)",
        (month, fleet_version, sum(h.allocated_seconds for h in held), sum(h.records for h in held), released_records),
    )
    merged: dict[tuple[str, str, str, str, str, int], list[int]] = {}
    for h in held:
        m = merged.setdefault(
            (h.reason, h.firm_id, h.day.isoformat(), h.provider_id, h.gpu_class, int(h.carried)), [0, 0]
        )
        m[0] += h.allocated_seconds
        m[1] += h.records
    tx.executemany(
        "INSERT INTO settlement_holds (month, reason, firm_id, day, provider_id, gpu_class, carried, "
        "allocated_seconds, records) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(month, *key, *sums) for key, sums in sorted(merged.items())],
    )


def settlement_holds(tx: Tx, month: str) -> list[HeldTotal]:
    rows = tx.query(
        "SELECT reason, firm_id, day, provider_id, gpu_class, allocated_seconds, records, carried "
        "FROM settlement_holds WHERE month = ? ORDER BY reason, firm_id, day, provider_id, gpu_class, carried",
        (month,),
    )
    return [
        HeldTotal(str(r[0]), str(r[1]), date.fromisoformat(r[2]), str(r[3]), str(r[4]), int(r[5]), int(r[6]),
                  bool(r[7]))
        for r in rows
    ]  # fmt: skip
