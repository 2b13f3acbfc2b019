"""deploy/ stays consistent with the loader: its flags exist, and the unit does not restart a stop."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from pipeline.cli import pipeline
from pipeline.loader import LoaderStopped

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def run_flags() -> set[str]:
    help_text = CliRunner().invoke(pipeline, ["run", "--help"]).output
    return set(re.findall(r"--[a-z][a-z-]+", help_text))


def test_the_loader_unit_uses_real_flags_and_does_not_restart_a_permanent_stop() -> None:
    unit = (DEPLOY / "systemd" / "gpumeter-loader.service").read_text()
    (exec_start,) = [x for x in unit.splitlines() if x.startswith("ExecStart=")]
    used = set(re.findall(r"--[a-z][a-z-]+", exec_start.split(" pipeline run ")[1]))
    assert {"--keys", "--metrics-port"} <= used <= run_flags()
    assert f"RestartPreventExitStatus={LoaderStopped.exit_code}" in unit.splitlines()


def test_the_loader_deployment_uses_real_flags() -> None:
    text = (DEPLOY / "kubernetes" / "loader-deployment.yaml").read_text()
    args = text.split('args: ["pipeline", "run"')[1].split("]")[0]
    used = set(re.findall(r"--[a-z][a-z-]+", args))
    assert {"--keys", "--metrics-port", "--metrics-addr"} <= used <= run_flags()
