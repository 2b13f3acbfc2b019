"""``gpumeter agent check``: one verdict per line, each check a small function returning (ok, text)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, describe_key, signing_key
from agent.spool import Spool
from gpumeter.errors import GpumeterError

Verdict = tuple[bool, str]


class ChecksFailed(GpumeterError):
    code = "check_failed"


EARLIEST_SANE = datetime(2025, 1, 1, tzinfo=UTC)
TIME_ERROR = 5  # adjtimex(2): the clock is not synchronised


def line(name: str, verdict: Verdict) -> str:
    ok, text = verdict
    return f"{'ok  ' if ok else 'FAIL'}  {name}: {text}"


def check_nvml(lib: Any = None) -> Verdict:
    from agent.nvml import Nvml
    from agent.nvml_source import gpu_class_for

    nvml = Nvml(lib=lib, backoff_min_s=0)
    if not nvml.ensure():
        return False, f"NVML not reachable ({nvml.last_error})"
    metered = [d for d in nvml.devices.values() if not d.mig_parent]
    if not metered:
        return False, "NVML reachable but no GPU listed"
    gpus = ", ".join(f"{d.uuid} ({gpu_class_for(d.name, d.memory_total_bytes)})" for d in metered)
    with contextlib.suppress(Exception):
        nvml.lib.nvmlShutdown()
    return True, f"{len(metered)} GPU(s): {gpus}"


def check_kafka(bootstrap: str, topic: str, timeout_s: float = 5.0, security: dict[str, Any] | None = None) -> Verdict:
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # the verdict line says it once
    try:
        from kafka import KafkaConsumer

        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            request_timeout_ms=int(timeout_s * 1000) + 1000,
            bootstrap_timeout_ms=int(timeout_s * 1000),
            **(security or {}),
        )
        try:
            topics = consumer.topics()
        finally:
            consumer.close()
    except Exception as exc:
        how = f" over {security['security_protocol']}" if security else ""
        return False, f"{bootstrap} not reachable{how} ({type(exc).__name__}: {exc})"
    if topic not in topics:
        return False, f"{bootstrap} reachable but topic {topic} does not exist"
    return True, f"{bootstrap} reachable, topic {topic} exists"


def check_spool(path: Path, max_bytes: int) -> Verdict:
    try:
        spool = Spool(path, max_bytes)
        probe = path / ".check"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"x")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except (OSError, GpumeterError) as exc:
        return False, f"{path} not writable ({exc})"
    state = (
        f"{spool.depth_windows} window(s) in {spool.depth_batches} batch(es), {spool.depth_bytes} of {max_bytes} bytes"
    )
    if spool.full:
        return False, f"{path} is FULL: {state}; new windows are being refused"
    return True, f"{path} writable, {state}"


def check_key(cfg: AgentConfig) -> Verdict:
    try:
        key = signing_key(cfg)
    except GpumeterError as exc:
        return False, str(exc)
    if key is None:
        return False, "no signing key configured (key_file): batches would go out unsigned"
    return True, f"key id {key[0]} ({describe_key(key[1])}) from {cfg.key_file}"


def kernel_clock_state() -> int | None:
    """adjtimex(2) with modes=0 (read only): TIME_OK..TIME_ERROR, or None where unavailable."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        buf = ctypes.create_string_buffer(512)  # struct timex is 208 bytes on x86-64; modes=0 at offset 0
        state = int(libc.adjtimex(buf))
    except (OSError, AttributeError):
        return None
    return None if state < 0 else state


def check_clock(now: Callable[[], float] = time.time, state: Callable[[], int | None] = kernel_clock_state) -> Verdict:
    t = datetime.fromtimestamp(now(), UTC)
    if t < EARLIEST_SANE:
        return False, f"system time {t:%Y-%m-%dT%H:%M:%SZ} is before {EARLIEST_SANE:%Y-%m-%d}: windows would be wrong"
    s = state()
    if s == TIME_ERROR:
        return False, f"kernel reports the clock unsynchronised (no NTP/PTP?) at {t:%Y-%m-%dT%H:%M:%SZ}"
    how = "synchronised" if s is not None else "sync state unknown"
    return True, f"{t:%Y-%m-%dT%H:%M:%SZ} UTC, kernel reports {how}"
