"""The settlement benchmark still runs (at a tiny size), so `make bench` cannot rot unseen."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_settle.py"


def test_settle_bench_runs_and_prints_bench_lines() -> None:
    env = {**os.environ, "BENCH_SETTLE_WINDOWS": "20000"}
    for var in ("GPUMETER_HOME", "GPUMETER_CLICKHOUSE_DSN", "GPUMETER_CLICKHOUSE_DATABASE", "GPUMETER_BILLING_DB"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, str(BENCH)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert re.fullmatch(r"BENCH settle_10k_firms_0\.02m_windows_s [\d.]+ s vs raw_sum_floor [\d.]+x", lines[0])
    assert re.fullmatch(r"BENCH settle_peak_rss_mb \d+ MB", lines[1])
    invoices = re.search(r"invoices: (\d+)", proc.stderr)
    assert invoices and int(invoices.group(1)) > 5000, proc.stderr[-3000:]  # ~8,600 of 10,000 firms used a GPU
    assert "held, not billed" not in proc.stderr  # the generated fleet is the registered one
