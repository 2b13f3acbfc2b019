"""deploy/ stays consistent with the agent: its settings files load, its flags exist."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from click.testing import CliRunner

from agent.cli import agent
from agent.config import load_agent_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def run_flags() -> set[str]:
    help_text = CliRunner().invoke(agent, ["run", "--help"]).output
    return set(re.findall(r"--[a-z][a-z-]+", help_text))


def test_systemd_agent_toml_loads_and_execstart_uses_real_flags() -> None:
    cfg = load_agent_config(DEPLOY / "systemd" / "agent.toml")
    assert cfg.key_file and cfg.spool_dir == "/var/lib/gpumeter/spool"
    unit = (DEPLOY / "systemd" / "gpumeter-agent.service").read_text()
    (exec_start,) = [x for x in unit.splitlines() if x.startswith("ExecStart=")]
    used = set(re.findall(r"--[a-z][a-z-]+", exec_start.split(" agent run ")[1]))
    assert used and used <= run_flags()


def test_daemonset_agent_toml_loads_and_args_use_real_flags(tmp_path: Path) -> None:
    text = (DEPLOY / "kubernetes" / "agent-daemonset.yaml").read_text()
    block = text.split("  agent.toml: |\n")[1].split("\n---")[0]
    toml = tmp_path / "agent.toml"
    toml.write_text(textwrap.dedent(block))
    cfg = load_agent_config(toml)
    assert cfg.attribution["order"] == ["kubernetes", "static"] and cfg.metrics_port == 9465
    (args,) = [x for x in text.splitlines() if x.strip().startswith("args:")]
    used = set(re.findall(r"--[a-z][a-z-]+", args.split('"run"')[1]))
    assert used and used <= run_flags()
