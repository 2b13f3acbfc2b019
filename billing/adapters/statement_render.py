"""A firm's statement as files: CSV (line items, daily usage) and one printable HTML page.

Pure formatting of a checked ``FirmStatement``: no store, no arithmetic beyond display.
"""

from __future__ import annotations

import calendar
import html
import io
import math
from datetime import date, timedelta
from decimal import Decimal
from fractions import Fraction

from billing.core.money import HOURS_DISPLAY_PLACES, format_gpu_hours, format_money, round_fraction_half_up
from billing.core.statement import FirmStatement, hours_by_item
from gpumeter import csvsafe

CLASS_COLOURS = ("#2f6fdf", "#e07a1f", "#2a9d6f", "#b23a8f", "#7a5cc7", "#c9a227", "#4a90a4", "#8a8a8a")


# ---------------------------------------------------------------- CSV

STATEMENT_CSVS = ("summary", "lines", "credits", "payments", "daily")


def statement_csv(st: FirmStatement) -> dict[str, str]:
    """One CSV per meaning, keyed by ``STATEMENT_CSVS``: the invoice's totals and status, its
    charge lines, its credits, the payments applied to it, and usage by day and class. Seconds
    are exact and tie across files (daily seconds add up to the lines'); hours are display."""
    inv = st.invoice
    out: dict[str, str] = {}

    def table(name: str, header: list[str], rows: list[list[str]]) -> None:
        buf = io.StringIO()
        w = csvsafe.writer(buf)
        w.writerow(header)
        w.writerows(rows)
        out[name] = buf.getvalue()

    status = st.status.status if st.status else "open"
    outstanding = st.status.outstanding if st.status else inv.amount_due
    table(
        "summary",
        ["invoice_id", "firm_id", "month", "issue_date", "due_date", "currency", "gross", "credit_total",
         "amount_due", "paid", "outstanding", "credit_balance", "status", "as_of"],
        [[inv.invoice_id, st.firm_id, st.month, inv.issue_date.isoformat(), inv.due_date.isoformat(), inv.currency,
          format_money(inv.gross), format_money(inv.credit_total), format_money(inv.amount_due),
          format_money(st.paid), format_money(outstanding), format_money(st.credit_balance), status,
          st.as_of.isoformat()]],
    )  # fmt: skip
    table(
        "lines",
        ["invoice_id", "provider_id", "gpu_class", "unit_price", "first_day", "last_day", "allocated_seconds",
         "gpu_hours", "busy_seconds", "busy_gpu_hours", "energy_joules", "energy_kwh", "amount", "adjustment_for"],
        [[inv.invoice_id, ln.provider_id, ln.gpu_class, str(ln.unit_price), first.isoformat(), last.isoformat(),
          str(ln.allocated_seconds), format_gpu_hours(ln.gpu_hours), str(ln.busy_seconds), _hours(ln.busy_seconds),
          str(ln.energy_joules), _kwh(ln.energy_joules), format_money(ln.amount), ln.adjustment_for or ""]
         for ln, (first, last) in zip(inv.lines, st.spans, strict=True)],
    )  # fmt: skip
    table(
        "credits",
        ["invoice_id", "voucher_id", "program_id", "subsidy_rate", "amount", "limits_reached"],
        [[inv.invoice_id, v.voucher_id, v.program_id, str(v.subsidy_rate), format_money(v.paid), "; ".join(v.limits)]
         for v in st.vouchers]
        if st.vouchers
        else [[inv.invoice_id, c.voucher_id, c.program_id, "", format_money(c.amount), ""] for c in inv.credits],
    )  # fmt: skip
    table(
        "payments",
        ["invoice_id", "paid_on", "reference", "amount_applied", "applied_on"],
        [[inv.invoice_id, p.paid_on.isoformat(), p.reference, format_money(p.amount), p.applied_on.isoformat()]
         for p in st.payments],
    )  # fmt: skip
    table(
        "daily",
        ["day", "provider_id", "gpu_class", "unit_price", "adjustment_for", "allocated_seconds", "gpu_hours",
         "busy_seconds", "busy_gpu_hours", "energy_joules", "energy_kwh"],
        [[d.day.isoformat(), d.provider_id, d.gpu_class, str(d.unit_price), d.late_for or "", str(d.allocated_seconds),
          format(round_fraction_half_up(h, HOURS_DISPLAY_PLACES), "f"), str(d.busy_seconds), _hours(d.busy_seconds),
          str(d.energy_joules), _kwh(d.energy_joules)]
         for d, h in zip(st.daily, hours_by_item(st), strict=True)],
    )  # fmt: skip
    return out


def _percent(rate: Decimal) -> str:
    text = f"{rate * 100:f}"
    return (text.rstrip("0").rstrip(".") if "." in text else text) + "%"


def _hours(seconds: int) -> str:
    return format_gpu_hours(Fraction(seconds, 3600))


def _kwh(joules: int) -> str:
    return format(round_fraction_half_up(Fraction(joules, 3_600_000), 3), "f")


# ---------------------------------------------------------------- HTML


def _ticks(peak: float) -> list[float]:
    """Round axis ticks from 0 to at least ``peak``: steps of 1, 2 or 5 times a power of ten."""
    if peak <= 0:
        return [0.0, 1.0]
    raw = peak / 4
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [step * i for i in range(math.ceil(peak / step - 1e-9) + 1)]


def _month_days(month: str) -> list[date]:
    year, mon = (int(x) for x in month.split("-"))
    first = date(year, mon, 1)
    return [first + timedelta(days=i) for i in range(calendar.monthrange(year, mon)[1])]


def _chart(st: FirmStatement) -> str:
    """Inline SVG: GPU-hours of every day of the month, stacked by class (days without usage are
    empty bars); late usage of earlier months is said under it (its days are not this month's)."""
    own = [d for d in st.daily if d.late_for is None]
    late = [d for d in st.daily if d.late_for is not None]
    days = _month_days(st.month)
    classes = sorted({d.gpu_class for d in own})
    seconds: dict[tuple[date, str], int] = {}
    for d in own:
        seconds[(d.day, d.gpu_class)] = seconds.get((d.day, d.gpu_class), 0) + d.allocated_seconds
    per_day = {day: sum(seconds.get((day, c), 0) for c in classes) for day in days}
    ticks = _ticks(max(per_day.values(), default=0) / 3600)
    top = ticks[-1]
    width, height, left, bottom = 720, 220, 56, 30
    bar_w = (width - left) / len(days)
    parts = [
        f'<svg role="img" aria-label="GPU-hours per day by class" viewBox="0 -20 {width} {height + bottom + 20}" '
        f'width="100%" xmlns="http://www.w3.org/2000/svg">',
        f'<text x="{left - 6}" y="-8" font-size="10" text-anchor="end">GPU-h</text>',
    ]
    for tick in ticks:
        y = height - tick / top * height
        label = f"{int(tick):,}" if tick == int(tick) else f"{tick:.10f}".rstrip("0")
        parts.append(f'<line x1="{left}" x2="{width}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(
            f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{label}</text>'
        )
    for i, day in enumerate(days):
        y = float(height)
        parts.append(f'<g class="bar" data-day="{day}">')  # one per day of the month, empty without usage
        for k, cls in enumerate(classes):
            h = seconds.get((day, cls), 0) / 3600 / top * height
            if h <= 0:
                continue
            y -= h
            colour = CLASS_COLOURS[k % len(CLASS_COLOURS)]
            parts.append(
                f'<rect x="{left + i * bar_w + 1:.1f}" y="{y:.1f}" width="{max(bar_w - 2, 1):.1f}" '
                f'height="{h:.1f}" fill="{colour}"><title>{day} {html.escape(cls)}: '
                f"{_hours(seconds[(day, cls)])} GPU-h</title></rect>"
            )
        parts.append("</g>")
        if day.day in (1, 5, 10, 15, 20, 25) or i == len(days) - 1:
            parts.append(
                f'<text class="day" x="{left + (i + 0.5) * bar_w:.1f}" y="{height + 16}" font-size="10" '
                f'text-anchor="middle">{day.day}</text>'
            )
    parts.append(f'<text x="{width}" y="{height + 28}" font-size="10" text-anchor="end">day of {st.month}</text>')
    parts.append("</svg>")
    legend = " ".join(
        f'<span class="key"><i style="background:{CLASS_COLOURS[k % len(CLASS_COLOURS)]}"></i>{html.escape(c)}</span>'
        for k, c in enumerate(classes)
    )
    note = ""
    if late:
        by_month: dict[str, int] = {}
        for d in late:
            by_month[d.late_for or ""] = by_month.get(d.late_for or "", 0) + d.allocated_seconds
        said = "; ".join(f"{_hours(sec)} GPU-h of {html.escape(m)}" for m, sec in sorted(by_month.items()))
        note = f'<p class="muted" id="late_usage">Also billed: late usage of earlier months, {said} (daily CSV).</p>'
    if not own:
        note = "<p>No usage on this month's own days.</p>" + note
    return "".join(parts) + f'<div class="legend">{legend}</div>' + note


CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Noto Sans CJK SC",sans-serif;margin:2rem auto;max-width:60rem;
color:#1c2430;padding:0 1rem}h1{font-size:1.5rem;margin:0}h2{font-size:1.1rem;margin-top:2rem;border-bottom:1px solid
#ccd;padding-bottom:.3rem}.muted{color:#667}table{border-collapse:collapse;width:100%;font-size:.9rem}th,td{padding:
.35rem .5rem;border-bottom:1px solid #e4e6eb;text-align:left}td.n,th.n{text-align:right;font-variant-numeric:
tabular-nums}.cards{display:flex;gap:1rem;flex-wrap:wrap;margin-top:1rem}.card{flex:1 1 10rem;border:1px solid #dde;
border-radius:8px;padding:.8rem}.card b{display:block;font-size:1.4rem;margin-top:.2rem}.split{display:flex;height:
1.6rem;border-radius:6px;overflow:hidden;margin:.6rem 0}.split div{color:#fff;font-size:.8rem;padding:.3rem .5rem;
white-space:nowrap}.legend{font-size:.8rem}.key{margin-right:1rem}.key i{display:inline-block;width:.8rem;height:.8rem;
margin-right:.3rem;vertical-align:middle}.status{font-weight:bold;text-transform:uppercase}.overdue{color:#b00020}
.paid{color:#1f7a3f}@media print{body{margin:0}.card{break-inside:avoid}}
"""


def statement_html(st: FirmStatement, currency_note: str = "") -> str:
    inv = st.invoice
    cur = html.escape(inv.currency)
    esc = html.escape
    gross = inv.gross
    subsidy_pct = (st.subsidy_share / gross * 100) if gross else Decimal(0)
    status = st.status.status if st.status else "open"
    paid = format_money(st.paid)
    outstanding = format_money(st.status.outstanding) if st.status else format_money(inv.amount_due)
    line_rows = "".join(
        f"<tr><td>{esc(ln.provider_id)}</td><td>{esc(ln.gpu_class)}</td>"
        f"<td>{first:%m-%d}{'' if first == last else f' to {last:%m-%d}'}</td><td class=n>{ln.unit_price}</td>"
        f"<td class=n>{format_gpu_hours(ln.gpu_hours)}</td><td class=n>{_hours(ln.busy_seconds)}</td>"
        f"<td class=n>{_kwh(ln.energy_joules)}</td><td class=n>{format_money(ln.amount)}</td>"
        f"<td>{'late usage of ' + esc(ln.adjustment_for) if ln.adjustment_for else ''}</td></tr>"
        for ln, (first, last) in zip(inv.lines, st.spans, strict=True)
    )
    payment_rows = (
        "".join(
            f"<tr><td>{p.paid_on}</td><td>{esc(p.reference)}</td><td class=n>{format_money(p.amount)}</td>"
            f"<td>{'' if p.applied_on == p.paid_on else f'applied {p.applied_on}, held as credit until then'}</td>"
            "</tr>"
            for p in st.payments
        )
        or f'<tr><td colspan=4 class="muted">No payment applied to this invoice as of {st.as_of}.</td></tr>'
    )
    balance = (
        f'<div class="card">Credit balance<b id="credit_balance">{format_money(st.credit_balance)} {cur}</b>'
        '<span class="muted">paid in advance: it pays the next invoices</span></div>'
        if st.credit_balance
        else ""
    )
    credit_rows = (
        "".join(
            f"<tr><td>{esc(v.voucher_id)}</td><td>{esc(v.program_id)}</td><td class=n>{_percent(v.subsidy_rate)}</td>"
            f"<td class=n>{format_money(v.paid)}</td><td>{esc('; '.join(v.limits))}</td></tr>"
            for v in st.vouchers
        )
        or '<tr><td colspan=5 class="muted">No voucher could pay this month.</td></tr>'
    )
    firm_w = float(st.firm_share / gross * 100) if gross else 100.0
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Usage statement {esc(st.firm_id)} {esc(st.month)}</title>
<style>{CSS}</style></head><body>
<header><h1>GPU usage statement - {esc(st.firm_name)} ({esc(st.firm_id)})</h1>
<div class="muted">Month {esc(st.month)} · invoice {esc(inv.invoice_id)} · issued {inv.issue_date} ·
due <b>{inv.due_date}</b> · status as of {st.as_of}: <span class="status {esc(status)}" id="status">{esc(status)}</span>
</div></header>
<section class="cards">
<div class="card">Gross (use)<b id="gross">{format_money(gross)} {cur}</b></div>
<div class="card">Paid by vouchers<b id="credit_total">{format_money(inv.credit_total)} {cur}</b></div>
<div class="card">Amount due<b id="amount_due">{format_money(inv.amount_due)} {cur}</b></div>
<div class="card">Paid / outstanding<b id="outstanding">{paid} / {outstanding}</b></div>
{balance}</section>
<h2>Who pays: the firm's share and the subsidised share</h2>
<div class="split" aria-label="firm share vs subsidy share">
<div style="width:{firm_w:.2f}%;background:#1c2430">firm {format_money(st.firm_share)}</div>
<div style="width:{100 - firm_w:.2f}%;background:#2a9d6f">subsidy {format_money(st.subsidy_share)}</div></div>
<p class="muted">Vouchers paid {subsidy_pct:.1f}% of this month's gross. {esc(currency_note)}</p>
<h2>Daily GPU-hours by class</h2>{_chart(st)}
<h2>Line items</h2>
<table id="lines"><thead><tr><th>Provider</th><th>GPU class</th><th>Days</th><th class=n>Price / GPU-h</th>
<th class=n>GPU-hours</th><th class=n>Busy GPU-h</th><th class=n>Energy kWh</th><th class=n>Amount</th><th>Note</th>
</tr></thead><tbody>{line_rows}</tbody>
<tfoot><tr><th colspan=7>Gross</th><th class=n>{format_money(gross)}</th><th></th></tr></tfoot></table>
<p class="muted">Billed on GPU-hours held (allocated). Busy GPU-hours (the GPU's measured utilisation) and energy
are shown for information and never priced; where an agent could not measure them they count as 0.</p>
<h2>Subsidy by voucher and program</h2>
<table id="credits"><thead><tr><th>Voucher</th><th>Program</th><th class=n>Rate</th><th class=n>Credit</th>
<th>Limits reached</th></tr></thead><tbody>{credit_rows}</tbody>
<tfoot><tr><th colspan=3>Total credits</th><th class=n>{format_money(inv.credit_total)}</th><th></th></tr></tfoot>
</table>
<p class="muted">A voucher pays its rate of what earlier vouchers left of each item, until it is used up, the
firm's cap in its program or the program's budget is reached, and only within its validity. "Limits reached"
lists those reached by the end of this month's settlement: where a voucher paid less than its rate, they are why.</p>
<h2>Payments</h2>
<table id="payments"><thead><tr><th>Received</th><th>Reference</th><th class=n>Applied to this invoice</th><th></th>
</tr></thead><tbody>{payment_rows}</tbody>
<tfoot><tr><th colspan=2>Paid</th><th class=n>{paid}</th><th></th></tr></tfoot></table>
<p class="muted">Prices include tax. GPU-hours are shown to 6 places; amounts are computed from exact hours.
Pay after use by the due date; payments settle the oldest open invoice first.</p>
</body></html>
"""
