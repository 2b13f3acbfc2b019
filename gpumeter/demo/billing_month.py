"""The billing half of ``gpumeter demo``: a Shanghai-style voucher program settled for real.

Configuration modelled on the programs in the field: a city compute-voucher pool
with "no application required" automatic grants at 30 % and a per-firm cap, plus a
district pool that pays 50-100 % for a few firms and runs dry during the month.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import click

from billing.adapters import state
from billing.adapters.clickhouse_usage import ClickHouseUsage
from billing.adapters.store import Store
from billing.app.load import load_files
from billing.app.reconcile import reconcile
from billing.app.settle import settle_month
from billing.app.statements import write_statements
from billing.core.money import format_money

RATES = """# Prices per GPU-hour, tax included (CNY). Domestic accelerators are priced lower.
currency = "CNY"
timezone = "Asia/Shanghai"

[[rate]]
gpu_class = "H100-80G"
provider = "*"
price_per_gpu_hour = "21.50"
effective_from = 2026-01-01

[[rate]]  # P02 runs its own H100 cluster at a negotiated price
gpu_class = "H100-80G"
provider = "P02"
price_per_gpu_hour = "19.80"
effective_from = 2026-01-01

[[rate]]
gpu_class = "A800-80G"
provider = "*"
price_per_gpu_hour = "12.80"
effective_from = 2026-01-01

[[rate]]
gpu_class = "Ascend-910B"
provider = "*"
price_per_gpu_hour = "9.90"
effective_from = 2026-01-01

[[rate]]  # the city cut the L40S price mid-month
gpu_class = "L40S-48G"
provider = "*"
price_per_gpu_hour = "6.40"
effective_from = 2026-01-01

[[rate]]
gpu_class = "L40S-48G"
provider = "*"
price_per_gpu_hour = "5.90"
effective_from = 2026-03-16
"""

PROGRAMS = """# The city's 2026 compute vouchers: 1 billion yuan a year, "no application required".
[[program]]
id = "SH-2026-COMPUTE"
year = 2026
category = "compute"
budget = "1000000000.00"
firm_cap = "6000.00"

[program.auto_grant]
face_value = "6000.00"
subsidy_rate = "0.30"

# A district AI-cluster pool for incubated start-ups: generous, and small.
[[program]]
id = "XH-2026-AI-CLUSTER"
year = 2026
category = "compute"
budget = "15000.00"
firm_cap = "12000.00"

# Model-API discounts: a different category, never applied to GPU usage.
[[program]]
id = "SH-2026-MODEL"
year = 2026
category = "model"
budget = "300000000.00"
firm_cap = "5000.00"
"""

VOUCHERS = """voucher_id,program_id,firm_id,face_value,subsidy_rate,valid_from,valid_until,priority
XH-0001,XH-2026-AI-CLUSTER,F0001,12000.00,1,2026-01-01,2026-12-31,10
XH-0002,XH-2026-AI-CLUSTER,F0002,12000.00,0.8,2026-01-01,2026-12-31,10
XH-0003,XH-2026-AI-CLUSTER,F0003,6000.00,0.5,2026-03-01,2026-03-20,10
"""

FIRMS = """firm_id,name,payment_terms_days
F0001,Huangpu Vision Start-up,30
F0002,Xuhui Embodied Robotics,30
F0003,Lingang Biomed AI,45
F0004,Pudong Fintech Models,30
F0005,Minhang Speech Lab,60
F0006,Yangpu Autonomous Driving,30
"""


def run_billing(work: Path, client: Any, database: str, month: str, step: Any) -> None:
    inputs = work / "billing-inputs"
    inputs.mkdir(exist_ok=True)
    for name, text in (
        ("rates.toml", RATES),
        ("programs.toml", PROGRAMS),
        ("vouchers.csv", VOUCHERS),
        ("firms.csv", FIRMS),
    ):
        (inputs / name).write_text(text)
    store = Store(f"sqlite:///{work / 'billing.sqlite3'}")
    report = load_files(
        store,
        datetime.now(UTC),
        inputs / "rates.toml",
        inputs / "programs.toml",
        inputs / "vouchers.csv",
        inputs / "firms.csv",
    )
    step("billing load: " + "; ".join(report.lines()))
    result = settle_month(store, ClickHouseUsage(client, database), month)
    gross = sum((i.gross for i in result.invoices), Decimal(0))
    credits = sum((i.credit_total for i in result.invoices), Decimal(0))
    step(
        f"settled {month}: {len(result.invoices)} invoices, gross {format_money(gross)} CNY, vouchers paid "
        f"{format_money(credits)}, firms owe {format_money(gross - credits)}"
    )
    click.echo("")
    click.echo(f"{'firm':<6} {'name':<28} {'gross':>11} {'subsidy':>10} {'share':>6} {'due':>11}  due date")
    with store.transaction() as tx:
        names = {f.firm_id: f.name for f in state.firms(tx).values()}
        for inv in result.invoices:
            share = (inv.credit_total / inv.gross * 100) if inv.gross else 0
            click.echo(
                f"{inv.firm_id:<6} {names.get(inv.firm_id, ''):<28} {format_money(inv.gross):>11} "
                f"{format_money(inv.credit_total):>10} {share:>5.1f}% {format_money(inv.amount_due):>11}  "
                f"{inv.due_date}"
            )
        drawn = state.drawn_state(tx).drawn_by_program
        programs = state.programs(tx)
    click.echo("")
    for pid, program in sorted(programs.items()):
        used = drawn.get(pid, Decimal(0))
        click.echo(
            f"  program {pid:<20} budget {format_money(program.budget):>16}  drawn {format_money(used):>10}"
            f"  left {format_money(program.budget - used):>16}"
        )
    check = reconcile(store, ClickHouseUsage(client, database), month)
    if check.problems:
        raise click.ClickException("reconciliation failed: " + "; ".join(check.problems))
    step(f"reconciled {month}: usage in ClickHouse = invoiced; every voucher, cap and budget invariant holds")
    today = datetime.now(ZoneInfo(result.settlement.timezone if result.settlement else "UTC")).date()
    files = write_statements(store, month, None, "html", work / "statements", today)  # payment status as of today
    write_statements(store, month, None, "csv", work / "statements", today)
    step(
        f"statements: {len(files)} firm statements (HTML + CSV), status as of {today}, each checked against its invoice"
    )
    click.echo(f"\nOpen: {files[0]}")
