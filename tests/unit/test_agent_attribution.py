"""Attribution: pure parsers over /proc text, resolvers over a fixture /proc tree."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent import attribution as a
from agent.config import AgentConfig
from agent.service import build_resolver

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
        a.slurm(proc, lambda job: None, {"acme": "F-ACME"}.get),
        a.static({"GPU-static": "F-STATIC"}),
        a.env_var(proc),
    )
    assert resolve(10, "GPU-x") == "F-POD"  # the pod wins over the env var the tenant set
    assert resolve(20, "GPU-x") == "F-ACME"  # slurm: job not mapped, account is
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
