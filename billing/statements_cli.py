"""``gpumeter statement``: a firm's monthly usage statement, as HTML or CSV files."""

from __future__ import annotations

import io
import sys
from datetime import UTC, date, datetime
from pathlib import Path

import click

from billing import state
from billing.statements import check_statement, firm_statement, statement_csv, statement_html
from billing.store import Store
from gpumeter.cli import settings_from


def write_statements(
    store: Store, month: str, firms: list[str] | None, fmt: str, out: Path, as_of: date, progress: bool = False
) -> list[Path]:
    """Write (and check) statements; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with store.transaction() as tx:
        targets = firms if firms else [i.firm_id for i in state.invoices(tx, month=month)]
        sink = sys.stderr if progress else io.StringIO()
        with click.progressbar(targets, label=f"statements {month}", file=sink) as bar:
            for firm_id in bar:
                st = firm_statement(tx, firm_id, month, as_of)
                check_statement(st)
                stem = out / f"statement-{firm_id}-{month}"
                if fmt == "html":
                    path = stem.with_suffix(".html")
                    path.write_text(statement_html(st), encoding="utf-8")
                    written.append(path)
                else:
                    lines, daily = statement_csv(st)
                    for suffix, text in (("-lines.csv", lines), ("-daily.csv", daily)):
                        path = Path(f"{stem}{suffix}")
                        path.write_text(text, encoding="utf-8")
                        written.append(path)
    return written


@click.command("statement")
@click.option(
    "--firm", "firm_ids", multiple=True, help="Firm id (repeatable). Default: every firm invoiced that month."
)
@click.option("--month", required=True, help="Settled month, YYYY-MM.")
@click.option("--format", "fmt", type=click.Choice(["html", "csv"]), default="html", show_default=True)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Folder to write the statements into.",
)
@click.option("--as-of", "as_of", default=None, help="Payment status as of this date (default today).")
@click.pass_context
def statement(
    ctx: click.Context, firm_ids: tuple[str, ...], month: str, fmt: str, out: Path, as_of: str | None
) -> None:
    """Write a firm's monthly usage statement: invoice summary, subsidy by voucher and
    program, amount due and due date, payment status, daily GPU-hours by class, line
    items, late-usage adjustment lines, and the firm's share vs the subsidised share.

    \b
    HTML is one self-contained, printable file; CSV is two files (line items, daily usage).
    Every statement is checked to equal its invoice to the fen before it is written.
    Example:
      gpumeter statement --firm F0001 --month 2026-03 --format html --out statements/
    """
    s = settings_from(ctx)
    day = date.fromisoformat(as_of) if as_of else datetime.now(UTC).date()
    files = write_statements(Store(s.billing_db_resolved), month, list(firm_ids), fmt, out, day, progress=True)
    for path in files:
        click.echo(str(path))
