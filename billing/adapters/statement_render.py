"""A firm's statement as files: CSV (line items, daily usage) and one printable HTML page.

Pure formatting of a checked ``FirmStatement``: no store, no arithmetic beyond display.
"""

from __future__ import annotations

import csv
import html
import io
from decimal import Decimal
from fractions import Fraction

from billing.core.money import format_gpu_hours, format_money
from billing.core.statement import FirmStatement

CLASS_COLOURS = ("#2f6fdf", "#e07a1f", "#2a9d6f", "#b23a8f", "#7a5cc7", "#c9a227", "#4a90a4", "#8a8a8a")


# ---------------------------------------------------------------- CSV


def statement_csv(st: FirmStatement) -> tuple[str, str]:
    """(line items CSV, daily usage CSV)."""
    lines = io.StringIO()
    w = csv.writer(lines)
    w.writerow(["invoice_id", "provider_id", "gpu_class", "unit_price", "gpu_hours", "amount", "adjustment_for"])
    for ln in st.invoice.lines:
        w.writerow(
            [
                st.invoice.invoice_id,
                ln.provider_id,
                ln.gpu_class,
                str(ln.unit_price),
                format_gpu_hours(ln.gpu_hours),
                format_money(ln.amount),
                ln.adjustment_for or "",
            ]
        )
    for c in st.invoice.credits:
        w.writerow([st.invoice.invoice_id, "", "", "", "", format_money(-c.amount), f"credit {c.voucher_id}"])
    daily = io.StringIO()
    d = csv.writer(daily)
    d.writerow(["day", "gpu_class", "gpu_hours"])
    for (day, cls), seconds in sorted(st.daily_seconds.items()):
        d.writerow([day.isoformat(), cls, format_gpu_hours(Fraction(seconds, 3600))])
    return lines.getvalue(), daily.getvalue()


# ---------------------------------------------------------------- HTML


def _chart(st: FirmStatement) -> str:
    """Inline SVG: daily GPU-hours stacked by class."""
    days = sorted({d for d, _ in st.daily_seconds})
    classes = sorted({c for _, c in st.daily_seconds})
    if not days:
        return "<p>No usage of this month's own days.</p>"
    per_day = {d: sum(s for (dd, _), s in st.daily_seconds.items() if dd == d) for d in days}
    peak_h = max(per_day.values()) / 3600 or 1
    width, height, left, bottom = 720, 220, 48, 28
    bar_w = (width - left) / len(days)
    parts = [
        f'<svg role="img" aria-label="Daily GPU-hours by class" viewBox="0 -12 {width} {height + bottom + 12}" '
        f'width="100%" xmlns="http://www.w3.org/2000/svg">'
    ]
    for frac in (0, 0.5, 1):
        y = height - frac * height
        parts.append(f'<line x1="{left}" x2="{width}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{peak_h * frac:.0f}</text>'
        )
    for i, d in enumerate(days):
        y = float(height)
        for k, cls in enumerate(classes):
            h = st.daily_seconds.get((d, cls), 0) / 3600 / peak_h * height
            if h <= 0:
                continue
            y -= h
            colour = CLASS_COLOURS[k % len(CLASS_COLOURS)]
            parts.append(
                f'<rect x="{left + i * bar_w + 1:.1f}" y="{y:.1f}" width="{max(bar_w - 2, 1):.1f}" '
                f'height="{h:.1f}" fill="{colour}"><title>{d} {html.escape(cls)}: '
                f"{st.daily_seconds[(d, cls)] / 3600:.2f} GPU-h</title></rect>"
            )
        if len(days) <= 31 and (i % 5 == 0 or i == len(days) - 1):
            parts.append(
                f'<text x="{left + (i + 0.5) * bar_w:.1f}" y="{height + 16}" font-size="10" '
                f'text-anchor="middle">{d.day}</text>'
            )
    parts.append("</svg>")
    legend = " ".join(
        f'<span class="key"><i style="background:{CLASS_COLOURS[k % len(CLASS_COLOURS)]}"></i>{html.escape(c)}</span>'
        for k, c in enumerate(classes)
    )
    return "".join(parts) + f'<div class="legend">{legend}</div>'


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
    paid = format_money(st.status.paid) if st.status else "0.00"
    outstanding = format_money(st.status.outstanding) if st.status else format_money(inv.amount_due)
    line_rows = "".join(
        f"<tr><td>{esc(ln.provider_id)}</td><td>{esc(ln.gpu_class)}</td><td class=n>{ln.unit_price}</td>"
        f"<td class=n>{format_gpu_hours(ln.gpu_hours)}</td><td class=n>{format_money(ln.amount)}</td>"
        f"<td>{'late usage of ' + esc(ln.adjustment_for) if ln.adjustment_for else ''}</td></tr>"
        for ln in inv.lines
    )
    credit_rows = (
        "".join(
            f"<tr><td>{esc(c.voucher_id)}</td><td>{esc(c.program_id)}</td>"
            f"<td class=n>{format_money(c.amount)}</td></tr>"
            for c in inv.credits
        )
        or '<tr><td colspan=3 class="muted">No voucher applied to this invoice.</td></tr>'
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
</section>
<h2>Who pays: the firm's share and the subsidised share</h2>
<div class="split" aria-label="firm share vs subsidy share">
<div style="width:{firm_w:.2f}%;background:#1c2430">firm {format_money(st.firm_share)}</div>
<div style="width:{100 - firm_w:.2f}%;background:#2a9d6f">subsidy {format_money(st.subsidy_share)}</div></div>
<p class="muted">Vouchers paid {subsidy_pct:.1f}% of this month's gross. {esc(currency_note)}</p>
<h2>Daily GPU-hours by class</h2>{_chart(st)}
<h2>Line items</h2>
<table><thead><tr><th>Provider</th><th>GPU class</th><th class=n>Price / GPU-h</th><th class=n>GPU-hours</th>
<th class=n>Amount</th><th>Note</th></tr></thead><tbody>{line_rows}</tbody>
<tfoot><tr><th colspan=4>Gross</th><th class=n>{format_money(gross)}</th><th></th></tr></tfoot></table>
<h2>Subsidy by voucher and program</h2>
<table><thead><tr><th>Voucher</th><th>Program</th><th class=n>Credit</th></tr></thead><tbody>{credit_rows}</tbody>
<tfoot><tr><th colspan=2>Total credits</th><th class=n>{format_money(inv.credit_total)}</th></tr></tfoot></table>
<p class="muted">Prices include tax. GPU-hours are shown to 6 places; amounts are computed from exact hours.
Pay after use by the due date; payments settle the oldest open invoice first.</p>
</body></html>
"""
