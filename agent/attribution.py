"""Who holds a GPU: resolvers from a process to a firm.

A resolver is ``(pid, gpu_uuid) -> firm_id | None``. The parsers are pure
functions over the text of ``/proc/PID/cgroup`` and ``/proc/PID/environ``; one
small reader (``ProcReader``, rooted anywhere so tests use fixture trees) is the
only I/O. ``chain`` tries resolvers in order and answers ``unattributed`` when
none knows: time with no resolvable owner is still recorded, never dropped.

Order matters for trust: cgroup-derived owners (Kubernetes pod, Slurm job) are
set by the scheduler and mapped to firms by files the scheduler's side keeps, a
static map by the provider - those are trusted. An environment variable is set
by whoever started the process, so a tenant can name any firm with it: the
``env`` resolver and a Slurm account read from the environment are off unless
configured, and documented as untrusted.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gpumeter.record import FIRM_ID_PATTERN, UNATTRIBUTED

log = logging.getLogger("gpumeter.agent.attribution")

Resolver = Callable[[int, str], str | None]  # (pid, gpu_uuid) -> firm_id or None
Lookup = Callable[[str], str | None]  # pod uid / job id / account -> firm_id or None

DEFAULT_FIRM_ENV = "GPUMETER_FIRM"
FIRM_ID = re.compile(FIRM_ID_PATTERN)
# pod UIDs: dashes under the cgroupfs driver, underscores under the systemd driver
POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
SLURM_JOB = re.compile(r"/job_(\d+)(?:/|$)")


def _cgroup_paths(cgroup_text: str) -> list[str]:
    """The path column of every ``hierarchy:controllers:path`` line (v1 and v2)."""
    return [line.split(":", 2)[2] for line in cgroup_text.splitlines() if line.count(":") >= 2]


def pod_uid_from_cgroup(cgroup_text: str) -> str | None:
    """Kubernetes pod UID (dashed form) from /proc/PID/cgroup, either cgroup driver."""
    for path in _cgroup_paths(cgroup_text):
        if "kubepods" in path:
            m = POD_UID.search(path)
            if m:
                return m.group(1).replace("_", "-")
    return None


def slurm_job_from_cgroup(cgroup_text: str) -> str | None:
    """Slurm job id from /proc/PID/cgroup (v1 ``/slurm/uid_U/job_J/...``, v2 ``slurmstepd.scope/job_J``)."""
    for path in _cgroup_paths(cgroup_text):
        if "slurm" in path:
            m = SLURM_JOB.search(path)
            if m:
                return m.group(1)
    return None


def environ_get(environ_raw: bytes, name: str) -> str | None:
    """One variable from the NUL-separated bytes of /proc/PID/environ."""
    want = name.encode()
    for item in environ_raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key == want:
            return value.decode(errors="replace")
    return None


def valid_firm(value: str | None) -> str | None:
    """A firm id as given, or None if it is empty or not a plausible id (never guessed at)."""
    if value is None:
        return None
    value = value.strip()
    return value if FIRM_ID.fullmatch(value) else None


@dataclass(frozen=True, slots=True)
class ProcReader:
    """Reads the two /proc files attribution needs; a vanished process reads as None."""

    root: Path = Path("/proc")

    def cgroup(self, pid: int) -> str | None:
        try:
            return (self.root / str(pid) / "cgroup").read_text()
        except OSError:
            return None

    def environ(self, pid: int) -> bytes | None:
        try:
            return (self.root / str(pid) / "environ").read_bytes()
        except OSError:
            return None


def kubernetes(proc: ProcReader, pod_firm: Lookup) -> Resolver:
    def resolve(pid: int, gpu_uuid: str) -> str | None:
        text = proc.cgroup(pid)
        uid = pod_uid_from_cgroup(text) if text else None
        return valid_firm(pod_firm(uid)) if uid else None

    return resolve


def slurm(
    proc: ProcReader,
    job_firm: Lookup,
    account_firm: Lookup | None = None,
    job_account: Lookup | None = None,
    account_from_env: bool = False,
) -> Resolver:
    """Job id from the cgroup path (set by slurmstepd) -> firm; else the job's account -> firm, the
    account as the scheduler recorded it (``job_account``: job id -> account, a file its prolog
    keeps) or, only with ``account_from_env``, the process's SLURM_JOB_ACCOUNT (untrusted: a job can
    start a process with any environment)."""

    def resolve(pid: int, gpu_uuid: str) -> str | None:
        text = proc.cgroup(pid)
        job = slurm_job_from_cgroup(text) if text else None
        if job is None:
            return None
        firm = valid_firm(job_firm(job))
        if firm is None and account_firm is not None:
            account = job_account(job) if job_account is not None else None
            if account is None and account_from_env:
                env = proc.environ(pid)
                account = environ_get(env, "SLURM_JOB_ACCOUNT") if env else None
            firm = valid_firm(account_firm(account)) if account else None
        return firm

    return resolve


def env_var(proc: ProcReader, name: str = DEFAULT_FIRM_ENV) -> Resolver:
    def resolve(pid: int, gpu_uuid: str) -> str | None:
        env = proc.environ(pid)
        return valid_firm(environ_get(env, name)) if env else None

    return resolve


def static(gpu_firms: Mapping[str, str], host_firm: str | None = None) -> Resolver:
    """A provider's fixed assignment: per GPU UUID, else the whole host, else nothing."""

    def resolve(pid: int, gpu_uuid: str) -> str | None:
        return valid_firm(gpu_firms.get(gpu_uuid, host_firm))

    return resolve


def chain(*resolvers: Resolver) -> Callable[[int, str], str]:
    """First resolver that knows wins; nobody knows -> ``unattributed`` (recorded, never dropped)."""

    def resolve(pid: int, gpu_uuid: str) -> str:
        for r in resolvers:
            firm = r(pid, gpu_uuid)
            if firm is not None:
                return firm
        return UNATTRIBUTED

    return resolve


@dataclass(slots=True)
class MappingFile:
    """A JSON object ``{key: firm_id}`` kept by someone else (e.g. a controller), reread when it changes."""

    path: Path
    _mtime_ns: tuple[int, int, int] = (-1, -1, -1)  # (inode, mtime, size): a rename in the same tick too
    _data: dict[str, str] = field(default_factory=dict)

    def __call__(self, key: str) -> str | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return self._data.get(key)  # keep the last good mapping if the file is briefly missing
        mtime = (st.st_ino, st.st_mtime_ns, st.st_size)
        if mtime != self._mtime_ns:
            try:
                data = json.loads(self.path.read_text())
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
                self._data = {str(k): str(v) for k, v in data.items()}
            except (OSError, ValueError) as exc:
                log.error("mapping file %s unreadable (%s); keeping the previous mapping", self.path, exc)
            self._mtime_ns = mtime
        return self._data.get(key)
