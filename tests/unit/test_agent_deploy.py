"""deploy/ stays consistent with the agent: its settings files load, its flags exist."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

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


# --- least privilege (issue: trust boundary) ----------------------------------------------------


def _unit(name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_the_agent_unit_runs_as_its_own_user_with_no_capability_and_a_private_umask() -> None:
    """Before: User=root with CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH, and no UMask."""
    unit = _unit("gpumeter-agent.service")
    assert unit["User"] == ["gpumeter"] and unit["Group"] == ["gpumeter"]
    assert unit["CapabilityBoundingSet"] == [""] and unit["AmbientCapabilities"] == [""]
    assert unit["UMask"] == ["0077"] and unit["NoNewPrivileges"] == ["yes"]
    assert unit["StateDirectoryMode"] == ["0700"]
    assert unit["SystemCallFilter"] == ["@system-service"]
    # no capability it needs: the shipped config reads no other user's environment
    cfg = load_agent_config(DEPLOY / "systemd" / "agent.toml")
    assert "env" not in cfg.attribution["order"] and not cfg.attribution.get("slurm_account_from_env")


def _daemonset() -> dict[str, Any]:
    import yaml

    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "agent-daemonset.yaml").read_text()))
    (ds,) = [d for d in docs if d and d["kind"] == "DaemonSet"]
    return ds


def test_the_daemonset_runs_the_agent_non_root_without_capabilities_token_or_writable_root() -> None:
    """Before: root with hostPID and SYS_PTRACE, no seccomp profile, the service-account token mounted."""
    spec = _daemonset()["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (agent,) = spec["containers"]
    sc = agent["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    # what root is needed for is done before, in an init container, with only the capability it needs
    (init,) = spec["initContainers"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]}
    assert init["securityContext"]["readOnlyRootFilesystem"] is True


def test_every_capability_a_manifest_adds_says_why() -> None:
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "add: [" in line:
                assert "#" in line.split("add: [", 1)[1], f"{path.name}:{n}: a capability without a reason"
    for path in sorted((DEPLOY / "systemd").glob("*.service")):
        for value in _unit(path.name).get("CapabilityBoundingSet", []) + _unit(path.name).get(
            "AmbientCapabilities", []
        ):
            assert value == "", f"{path.name}: capabilities {value}"


def test_the_daemonsets_agent_reads_its_key_where_the_init_container_put_it() -> None:
    ds = _daemonset()["spec"]["template"]["spec"]
    text = (DEPLOY / "kubernetes" / "agent-daemonset.yaml").read_text()
    block = text.split("  agent.toml: |\n")[1].split("\n---")[0]
    key_file = re.search(r'key_file = "([^"]+)"', block)
    assert key_file is not None
    (agent,) = ds["containers"]
    mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    assert Path(key_file.group(1)).parent == Path(mounts["run"])
    (init,) = ds["initContainers"]
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert f"{init_mounts['run']}/{Path(key_file.group(1)).name}" in " ".join(init["command"])
    assert {"name": "host-key", "mountPath": "/secret", "readOnly": True} in init["volumeMounts"]
    assert "host-key" not in mounts  # the agent never sees the root-owned Secret


def test_the_slurm_prolog_records_the_schedulers_account_and_the_epilog_forgets_it(tmp_path: Path) -> None:
    import json
    import os
    import subprocess

    script = DEPLOY / "slurm" / "gpumeter-job-account"
    path = tmp_path / "slurm" / "slurm-job-accounts.json"
    env = {"PATH": os.environ["PATH"], "GPUMETER_SLURM_DIR": str(path.parent)}
    for job, account in (("4242", "lab"), ("4243", "acme")):
        run = subprocess.run([str(script)], env={**env, "SLURM_JOB_ID": job, "SLURM_JOB_ACCOUNT": account,
                             "SLURM_SCRIPT_CONTEXT": "prolog_slurmd"}, capture_output=True, text=True)  # fmt: skip
        assert run.returncode == 0, run.stderr
    assert json.loads(path.read_text()) == {"4242": "lab", "4243": "acme"}
    subprocess.run([str(script)], env={**env, "SLURM_JOB_ID": "4242", "SLURM_SCRIPT_CONTEXT": "epilog_slurmd"},
                   check=True)  # fmt: skip
    assert json.loads(path.read_text()) == {"4243": "acme"}
    assert oct(path.stat().st_mode & 0o777) == "0o644"  # the agent, another user, reads it
    # a link planted where the script writes its temporary file is not followed
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (path.parent / "slurm-job-accounts.json.tmp").symlink_to(victim)
    subprocess.run([str(script)], env={**env, "SLURM_JOB_ID": "7", "SLURM_JOB_ACCOUNT": "x",
                   "SLURM_SCRIPT_CONTEXT": "prolog_slurmd"}, check=True)  # fmt: skip
    assert victim.read_text() == "keep" and json.loads(path.read_text()) == {"4243": "acme", "7": "x"}
    # no context (run by hand, say): nothing changes; it still exits 0
    run = subprocess.run([str(script)], env={**env, "SLURM_JOB_ID": "8"})
    assert run.returncode == 0 and "8" not in json.loads(path.read_text())
