"""Attribution: pure parsers over /proc text, resolvers over a fixture /proc tree."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent import attribution as a
from agent.config import AgentConfig
from agent.service import build_resolver
from gpumeter.errors import ConfigError

POD = "4f1c2d3e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"
CGROUPS = {
    "k8s-cgroupfs-v1": (
        "12:memory:/kubepods/burstable/pod4f1c2d3e-5a6b-4c7d-8e9f-0a1b2c3d4e5f/0123abcd\n"
        "11:cpu,cpuacct:/kubepods/burstable/pod4f1c2d3e-5a6b-4c7d-8e9f-0a1b2c3d4e5f/0123abcd\n"
    ),
    "k8s-systemd-v2": (
        "0::/kubepods.slice/kubepods-burstable.slice/"
        "kubepods-burstable-pod4f1c2d3e_5a6b_4c7d_8e9f_0a1b2c3d4e5f.slice/cri-containerd-0123abcd.scope\n"
    ),
    "k8s-guaranteed-systemd": (
        "0::/kubepods.slice/kubepods-pod4f1c2d3e_5a6b_4c7d_8e9f_0a1b2c3d4e5f.slice/cri-containerd-9.scope\n"
    ),
    "slurm-v1": "4:memory:/slurm/uid_1000/job_4242/step_batch/task_0\n3:cpuset:/slurm/uid_1000/job_4242/step_0\n",
    "slurm-v2": "0::/system.slice/slurmstepd.scope/job_4242/step_0/user/task_0\n",
    "plain-user": "0::/user.slice/user-1000.slice/session-3.scope\n",
    "docker": "0::/system.slice/docker-0123abcd.scope\n",
}


@pytest.mark.parametrize(
    ("case", "pod", "job"),
    [
        ("k8s-cgroupfs-v1", POD, None),
        ("k8s-systemd-v2", POD, None),
        ("k8s-guaranteed-systemd", POD, None),
        ("slurm-v1", None, "4242"),
        ("slurm-v2", None, "4242"),
        ("plain-user", None, None),
        ("docker", None, None),
    ],
    ids=lambda v: v if isinstance(v, str) and not v[:1].isdigit() else "",
)
def test_pod_uid_and_slurm_job_from_cgroup(case: str, pod: str | None, job: str | None) -> None:
    assert a.pod_uid_from_cgroup(CGROUPS[case]) == pod
    assert a.slurm_job_from_cgroup(CGROUPS[case]) == job


def test_environ_parsing() -> None:
    raw = b"PATH=/bin\0GPUMETER_FIRM=F0007\0EMPTY=\0NOEQUALS\0GPUMETER_FIRMX=no\0"
    assert a.environ_get(raw, "GPUMETER_FIRM") == "F0007"
    assert a.environ_get(raw, "EMPTY") == ""
    assert a.environ_get(raw, "NOEQUALS") is None
    assert a.environ_get(raw, "MISSING") is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [("F0001", "F0001"), (" F1 \n", "F1"), ("", None), ("a b", None), ("x" * 65, None), (None, None)],
)
def test_firm_ids_are_taken_as_given_or_not_at_all(value: str | None, expected: str | None) -> None:
    assert a.valid_firm(value) == expected


def make_proc(root: Path, pid: int, cgroup: str, environ: dict[str, str] | None = None) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "cgroup").write_text(cgroup)
    (d / "environ").write_bytes(b"".join(f"{k}={v}\0".encode() for k, v in (environ or {}).items()))


@pytest.fixture
def proc(tmp_path: Path) -> a.ProcReader:
    root = tmp_path / "proc"
    make_proc(root, 10, CGROUPS["k8s-systemd-v2"], {"GPUMETER_FIRM": "F-ENV"})
    make_proc(root, 20, CGROUPS["slurm-v2"], {"SLURM_JOB_ACCOUNT": "acme"})
    make_proc(root, 30, CGROUPS["plain-user"], {"GPUMETER_FIRM": "F-ENV"})
    make_proc(root, 40, CGROUPS["docker"])
    return a.ProcReader(root)


def test_chain_first_answer_wins_and_nobody_means_unattributed(proc: a.ProcReader) -> None:
    resolve = a.chain(
        a.kubernetes(proc, {POD: "F-POD"}.get),
        a.slurm(proc, lambda job: None, {"acme": "F-ACME"}.get, account_from_env=True),
        a.static({"GPU-static": "F-STATIC"}),
        a.env_var(proc),
    )
    assert resolve(10, "GPU-x") == "F-POD"  # the pod wins over the env var the tenant set
    assert resolve(20, "GPU-x") == "F-ACME"  # slurm: job not mapped, account (from the env, allowed here) is
    assert resolve(30, "GPU-x") == "F-ENV"
    assert resolve(40, "GPU-static") == "F-STATIC"
    assert resolve(40, "GPU-x") == "unattributed"
    assert resolve(99, "GPU-x") == "unattributed"  # the process is gone: still recorded


def test_mapping_file_is_reread_when_it_changes_and_kept_when_broken(tmp_path: Path) -> None:
    path = tmp_path / "pods.json"
    path.write_text(json.dumps({POD: "F1"}))
    m = a.MappingFile(path)
    assert m(POD) == "F1"
    path.write_text(json.dumps({POD: "F2"}))
    os.utime(path, ns=(1, 2_000_000_000_000_000_000))
    assert m(POD) == "F2"
    path.write_text("{not json")
    os.utime(path, ns=(1, 3_000_000_000_000_000_000))
    assert m(POD) == "F2"


def test_build_resolver_from_config(proc: a.ProcReader, tmp_path: Path) -> None:
    pods = tmp_path / "pods.json"
    pods.write_text(json.dumps({POD: "F-POD"}))
    cfg = AgentConfig(
        attribution={"proc_root": str(proc.root), "pod_firms_file": str(pods), "order": ["kubernetes", "env"]}
    )
    resolve = build_resolver(cfg)
    assert [resolve(pid, "GPU-x") for pid in (10, 20, 30)] == ["F-POD", "unattributed", "F-ENV"]


def test_a_slurm_account_comes_from_the_schedulers_record_not_the_jobs_environment(
    proc: a.ProcReader, tmp_path: Path
) -> None:
    """Job 4242's process says SLURM_JOB_ACCOUNT=acme; the prolog recorded the job under 'lab'.
    Before, the environment was believed: a job could bill another account's firm."""
    accounts = tmp_path / "job-accounts.json"
    accounts.write_text(json.dumps({"4242": "lab"}))
    firms = {"acme": "F-ACME", "lab": "F-LAB"}
    cfg = AgentConfig(attribution={"proc_root": str(proc.root), "order": ["slurm"], "slurm_account_firms": firms,
                                   "slurm_job_accounts_file": str(accounts)})  # fmt: skip
    assert build_resolver(cfg)(20, "GPU-x") == "F-LAB"
    accounts.write_text(json.dumps({}))
    os.utime(accounts, ns=(1, 2_000_000_000_000_000_000))
    assert build_resolver(cfg)(20, "GPU-x") == "unattributed"  # not recorded: not the environment's word
    with pytest.raises(ConfigError, match="slurm_account_firms needs to know each job's account"):
        build_resolver(AgentConfig(attribution={"order": ["slurm"], "slurm_account_firms": firms}))


def test_without_an_order_no_environment_variable_names_a_firm(proc: a.ProcReader, tmp_path: Path) -> None:
    """The default order is the scheduler's and the provider's word only; before, it ended in env."""
    cfg = AgentConfig(attribution={"proc_root": str(proc.root)})
    assert build_resolver(cfg)(30, "GPU-x") == "unattributed"  # pid 30 says GPUMETER_FIRM=F-ENV


@pytest.mark.parametrize("where", ["systemd", "kubernetes", "example"])
def test_the_shipped_configs_bill_no_process_to_the_firm_its_environment_names(where: str, tmp_path: Path) -> None:
    """Every agent config we ship, read as shipped: a process in a Slurm job or a pod whose environment
    names a firm (GPUMETER_FIRM, SLURM_JOB_ACCOUNT) is not billed to it on that word."""
    import textwrap

    from agent.config import load_agent_config

    root = Path(__file__).resolve().parents[2]
    if where == "kubernetes":
        text = (root / "deploy" / "kubernetes" / "agent-daemonset.yaml").read_text()
        path = tmp_path / "agent.toml"
        path.write_text(textwrap.dedent(text.split("  agent.toml: |\n")[1].split("\n---")[0]))
    else:
        path = root / ("deploy/systemd/agent.toml" if where == "systemd" else "docs/examples/agent.toml")
    cfg = load_agent_config(path)
    proc_root = tmp_path / "proc"
    lies = {"GPUMETER_FIRM": "F-VICTIM", "SLURM_JOB_ACCOUNT": "acme-ai"}
    for pid, cgroup in ((20, CGROUPS["slurm-v2"]), (10, CGROUPS["k8s-systemd-v2"]), (30, CGROUPS["plain-user"])):
        make_proc(proc_root, pid, cgroup, lies)
    attr = {k: v for k, v in cfg.attribution.items() if not k.endswith("_file")}
    for key in ("slurm_job_accounts_file", "pod_firms_file", "slurm_job_firms_file"):
        if key in cfg.attribution:  # the scheduler side has recorded nothing yet
            (tmp_path / key).write_text("{}")
            attr[key] = str(tmp_path / key)
    resolve = build_resolver(AgentConfig(attribution={**attr, "proc_root": str(proc_root)}))
    for pid in (10, 20, 30):
        assert resolve(pid, "GPU-none") == "unattributed", (where, pid)
