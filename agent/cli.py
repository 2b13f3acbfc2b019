"""``gpumeter agent``: run the meter on a GPU host."""

from __future__ import annotations

import signal
import socket
import sys
import zlib
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import click

from agent.kafka_sink import KafkaSink
from agent.runner import Agent, run_realtime
from agent.simulate import SimulatedFleet
from agent.windows import HostIdentity
from gpumeter.cli import settings_from
from gpumeter.errors import ConfigError


@click.group()
def agent() -> None:
    """Meter GPUs on this host and send usage windows to Kafka."""


@agent.command("run")
@click.option(
    "--simulate",
    "simulate",
    type=click.IntRange(min=1),
    metavar="N",
    help="Meter N simulated GPUs instead of NVML (benchmarks, demos, hosts without GPUs).",
)
@click.option(
    "--interval",
    "interval_s",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Seconds between samples.",
)
@click.option(
    "--window",
    "window_s",
    type=click.IntRange(min=1),
    default=60,
    show_default=True,
    help="Window length in seconds; windows align to wall-clock multiples of it.",
)
@click.option(
    "--kafka",
    "kafka_bootstrap",
    metavar="BOOTSTRAP",
    help="Kafka bootstrap servers (default: GPUMETER_KAFKA_BOOTSTRAP or config).",
)
@click.option("--topic", help="Kafka topic (default gpumeter.usage.v1).")
@click.option(
    "--spool",
    type=click.Path(file_okay=False, path_type=Path),
    help="Spool directory for windows not yet acknowledged by Kafka.",
)
@click.option("--provider", "provider_id", default="P01", show_default=True, help="Provider id of this host.")
@click.option("--host-id", default=None, help="Host id (default: the machine's hostname).")
@click.option(
    "--duration", type=float, default=None, help="Stop after this many seconds (default: run until stopped)."
)
@click.pass_context
def run(
    ctx: click.Context,
    simulate: int | None,
    interval_s: int,
    window_s: int,
    kafka_bootstrap: str | None,
    topic: str | None,
    spool: Path | None,
    provider_id: str,
    host_id: str | None,
    duration: float | None,
) -> None:
    """Sample GPUs every --interval seconds, close --window windows, send them to Kafka (acks=all).

    \b
    Example (no GPU needed):
      gpumeter agent run --simulate 8 --interval 1 --kafka 127.0.0.1:9092 --duration 120
    """
    settings = settings_from(ctx, kafka_bootstrap=kafka_bootstrap, topic=topic)
    if window_s % interval_s:
        raise click.BadParameter(f"--window ({window_s}) must be a multiple of --interval ({interval_s})")
    if simulate is None:
        raise ConfigError(
            "NVML metering is not in this build yet (it comes with the agent issue); "
            "use --simulate N to meter simulated GPUs"
        )
    if spool is not None:
        spool.mkdir(parents=True, exist_ok=True)
    host = host_id or socket.gethostname()
    now = datetime.now(UTC)
    days = int((duration or 86400 * 365) // 86400) + 2
    fleet = SimulatedFleet(
        seed=zlib.crc32(host.encode()),
        start=now.replace(microsecond=0),
        days=days,
        providers=1,
        hosts_per_provider=1,
        gpus_per_host=simulate,
        quantum_s=interval_s,
    )
    source = fleet.host_source(fleet.hosts()[0].host_id)
    sink = KafkaSink(settings.kafka_bootstrap, settings.topic)
    meter = Agent(source, HostIdentity(provider_id, host), sink, window_s=window_s, interval_s=interval_s)
    stopping = False

    def _stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        run_realtime(meter, interval_s, duration, should_stop=lambda: stopping)
        sink.flush()
    finally:
        sink.close()
    click.echo(
        f"samples={meter.samples} windows={meter.windows_closed} messages_sent={sink.messages_sent}",
        file=sys.stderr,
    )
