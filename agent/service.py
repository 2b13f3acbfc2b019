"""Assembles a running agent from its settings: source (NVML or simulated), spool, sender, metrics.

Two threads: the sampler (the caller's, wall-clock ticks; writes the spool) and
the sender (drains the spool to Kafka). They share only the spool directory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent import AGENT_VERSION, attribution
from agent.config import AgentConfig, describe_key, signing_key
from agent.devices import DeviceSource
from agent.kafka_sink import KafkaSink
from agent.runner import Agent, run_realtime
from agent.sender import SpoolSender
from agent.spool import Spool
from agent.windows import HostIdentity
from gpumeter.errors import ConfigError
from gpumeter.metrics import Metric, one, render, serve, write_textfile

log = logging.getLogger("gpumeter.agent")

RESOLVERS = ("kubernetes", "slurm", "static", "env")
# the scheduler's and the provider's word only; "env" (a tenant's word) runs only when named
DEFAULT_ORDER = ("kubernetes", "slurm", "static")
METRICS_EVERY_S = 10
# The spool rides out an outage, so the producer should give up fast and let the sender retry:
# no 30 s bootstrap wait, no 60 s block on metadata, reconnects at most 2 s apart.
OUTAGE_TOLERANT: dict[str, Any] = {"bootstrap_timeout_ms": 5000, "max_block_ms": 5000, "reconnect_backoff_max_ms": 2000}


@dataclass(frozen=True, slots=True)
class SimSpec:
    gpus: int
    seed: int
    start_s: int  # the fleet's epoch: the same seed, start and days give the same jobs after a restart
    days: int = 35
    mean_job_s: int = 3 * 3600


def build_resolver(cfg: AgentConfig) -> Callable[[int, str], str]:
    a = cfg.attribution
    proc = attribution.ProcReader(Path(a.get("proc_root", "/proc")))
    chosen: list[attribution.Resolver] = []
    for name in a.get("order", list(DEFAULT_ORDER)):
        if name not in RESOLVERS:
            raise ConfigError(f"unknown attribution resolver {name!r}; known: {', '.join(RESOLVERS)}")
        if name == "kubernetes" and a.get("pod_firms_file"):
            chosen.append(attribution.kubernetes(proc, attribution.MappingFile(Path(a["pod_firms_file"]))))
        elif name == "slurm" and (a.get("slurm_job_firms_file") or a.get("slurm_account_firms")):
            jobs = a.get("slurm_job_firms_file")
            job_firm = attribution.MappingFile(Path(jobs)) if jobs else (lambda job: None)
            accounts = dict(a.get("slurm_account_firms", {}))
            accounts_file, from_env = a.get("slurm_job_accounts_file"), bool(a.get("slurm_account_from_env"))
            if accounts and not (accounts_file or from_env):
                raise ConfigError(
                    "[attribution] slurm_account_firms needs to know each job's account: set "
                    "slurm_job_accounts_file (kept by the Slurm prolog, see agent/README.md), or "
                    "slurm_account_from_env = true (untrusted: a job can set its own environment)"
                )
            if from_env:
                log.warning("attribution: Slurm accounts are read from each process's environment (untrusted): "
                            "a job can name another firm's account")  # fmt: skip
            job_account = attribution.MappingFile(Path(accounts_file)) if accounts_file else None
            chosen.append(attribution.slurm(proc, job_firm, accounts.get, job_account, from_env))
        elif name == "static" and (a.get("gpu_firms") or a.get("host_firm")):
            chosen.append(attribution.static(dict(a.get("gpu_firms", {})), a.get("host_firm")))
        elif name == "env":
            var = a.get("env_var", attribution.DEFAULT_FIRM_ENV)
            log.warning("attribution: the env resolver is on (untrusted): a process that sets %s is billed "
                        "to the firm it names", var)  # fmt: skip
            chosen.append(attribution.env_var(proc, var))
    return attribution.chain(*chosen)


def build_source(cfg: AgentConfig, sim: SimSpec | None) -> tuple[DeviceSource, HostIdentity, Any]:
    """(source, identity, nvml session or None)."""
    identity = HostIdentity(cfg.provider_id, cfg.host)
    if sim is not None:
        from agent.simulate import SimulatedFleet

        fleet = SimulatedFleet(
            seed=sim.seed,
            start=datetime.fromtimestamp(sim.start_s, UTC),
            days=sim.days,
            providers=1,
            hosts_per_provider=1,
            gpus_per_host=sim.gpus,
            quantum_s=cfg.interval_s,
            mean_job_s=sim.mean_job_s,
        )
        return fleet.host_source(fleet.hosts()[0].host_id), identity, None
    from agent.nvml import LIBRARY_NOT_FOUND, Nvml
    from agent.nvml_source import NvmlSource

    nvml = Nvml()
    if not nvml.ensure() and nvml.last_error_code == LIBRARY_NOT_FOUND:
        raise ConfigError(
            f"NVML is not available on this host ({nvml.last_error.removeprefix('init failed: ')}): "
            "install the NVIDIA driver, or use --simulate N to meter simulated GPUs"
        )
    return NvmlSource(nvml, build_resolver(cfg), cfg.interval_s, cfg.gpu_classes), identity, nvml


def collect(agent: Agent, spool: Spool, sender: SpoolSender, nvml: Any) -> list[Metric]:
    p = "gpumeter_agent_"
    out = [
        one(p + "samples_total", "counter", "Sampling instants taken.", agent.samples),
        one(p + "samples_missed_total", "counter", "GPU samples nobody is billed for (device unreadable).",
            agent.acc.samples_missed),
        one(p + "samples_skipped_total", "counter",
            "GPU sampling instants not sampled (a tick the loop skipped, the agent down).", agent.acc.samples_skipped),
        one(p + "samples_rejected_total", "counter", "Samples at or before an already counted instant.",
            agent.acc.samples_rejected),
        one(p + "windows_closed_total", "counter", "Usage windows closed.", agent.windows_closed),
        one(p + "gpu_windows_closed_total", "counter", "GPU windows closed (every second of each GPU's window).",
            agent.gpu_windows_closed),
        one(p + "next_seq", "gauge", "Sequence number of the next window.", agent.acc.next_seq),
        one(p + "spool_batches", "gauge", "Batches spooled, not yet acknowledged by Kafka.", spool.depth_batches),
        one(p + "spool_windows", "gauge", "Windows spooled, not yet acknowledged by Kafka.", spool.depth_windows),
        one(p + "spool_bytes", "gauge", "Bytes spooled.", spool.depth_bytes),
        one(p + "spool_max_bytes", "gauge", "Spool bound; at it, new windows are refused.", spool.max_bytes),
        one(p + "spool_oldest_age_seconds", "gauge", "Age of the oldest spooled batch.", spool.oldest_age_s()),
        one(p + "spool_full", "gauge", "1 while the spool is full.", int(spool.full)),
        one(p + "windows_dropped_total", "counter", "Windows refused because the spool was full.",
            spool.windows_dropped),
        one(p + "gpu_windows_dropped_total", "counter", "GPU windows refused because the spool was full.",
            spool.gpu_windows_dropped),
        one(p + "spool_quarantined_total", "counter", "Spool files set aside as corrupt.", spool.quarantined),
        one(p + "send_errors_total", "counter", "Kafka sends not acknowledged.", sender.send_errors),
        one(p + "messages_sent_total", "counter", "Kafka messages acknowledged.", sender.messages_sent),
        one(p + "windows_sent_total", "counter", "Windows acknowledged by Kafka.", sender.windows_sent),
        one(p + "heartbeats_sent_total", "counter", "Heartbeats acknowledged by Kafka (nothing else to send).",
            sender.heartbeats_sent),
    ]  # fmt: skip
    if nvml is not None:
        kinds = ("not_supported", "function_not_found", "gpu_lost", "reinit", "down", "other")
        out.append(Metric(p + "nvml_errors_total", "counter", "NVML errors by kind.",
                          tuple(({"kind": k}, nvml.errors[k]) for k in kinds)))  # fmt: skip
        out.append(one(p + "nvml_up", "gauge", "1 while the NVML session is initialised.", int(nvml.up)))
    return out


def run_agent(
    cfg: AgentConfig,
    bootstrap: str,
    topic: str,
    sim: SimSpec | None,
    duration_s: float | None,
    should_stop: Callable[[], bool],
    home: Path,
    security: dict[str, Any] | None = None,
) -> tuple[Agent, Spool, SpoolSender]:
    key = signing_key(cfg)
    if key is None:
        log.warning("no signing key configured (key_file): batches go out unsigned")
    else:
        log.info("signing as key id %s (%s)", key[0], describe_key(key[1]))
    source, identity, nvml = build_source(cfg, sim)
    spool = Spool(Path(cfg.spool_dir) if cfg.spool_dir else home / "spool", cfg.spool_max_bytes, key)
    meter = Agent(source, identity, spool, cfg.window_s, cfg.interval_s, checkpoint=spool)
    sender = SpoolSender(
        spool,
        lambda: KafkaSink(bootstrap, topic, **OUTAGE_TOLERANT, **(security or {})),
        backoff_max_s=cfg.send_retry_max_s,
        heartbeat=lambda: (identity.host_id, *spool.heartbeat(identity.host_id, AGENT_VERSION)),
    )

    def body() -> str:
        return render(collect(meter, spool, sender, nvml))

    server = serve(cfg.metrics_addr, cfg.metrics_port, body) if cfg.metrics_port else None
    textfile = Path(cfg.metrics_textfile) if cfg.metrics_textfile else None

    def after_sample(now_s: int) -> None:
        if textfile is not None and now_s % METRICS_EVERY_S == 0:
            try:
                write_textfile(textfile, body())
            except OSError as exc:  # the collector's directory is not ours: say so, keep metering
                log.error("cannot write the metrics textfile %s: %s", textfile, exc)

    log.info(
        "agent %s started: host %s, %s, interval %d s, window %d s, spool %s (%d batch(es) waiting), next seq %d",
        AGENT_VERSION, identity.host_id, f"{sim.gpus} simulated GPU(s)" if sim else "NVML",
        cfg.interval_s, cfg.window_s, spool.root, spool.depth_batches, meter.acc.next_seq,
    )  # fmt: skip
    sender.start()
    try:
        run_realtime(meter, cfg.interval_s, duration_s, should_stop, after_sample)
    finally:
        sender.stop()
        if textfile is not None:
            write_textfile(textfile, body())
        if server is not None:
            server.shutdown()
    log.info(
        "agent stopped: samples=%d windows=%d sent=%d spooled=%d send_errors=%d",
        meter.samples, meter.windows_closed, sender.windows_sent, spool.depth_windows, sender.send_errors,
    )  # fmt: skip
    return meter, spool, sender
