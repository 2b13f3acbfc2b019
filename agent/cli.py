"""``gpumeter agent``: run the meter on a GPU host, or check that it can run."""

from __future__ import annotations

import logging
import sys
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from agent.config import AgentConfig, json_logging, load_agent_config, new_key_file
from agent.service import SimSpec, run_agent
from gpumeter.cli import settings_from
from gpumeter.record import public_key_text
from gpumeter.signals import stop_requested


@click.group()
def agent() -> None:
    """Meter GPUs on this host and send usage windows to Kafka."""


def _agent_options(f: Any) -> Any:
    options = [
        click.option(
            "--agent-config",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Agent settings (TOML; default $GPUMETER_HOME/agent.toml if it exists).",
        ),
        click.option("--kafka", "kafka_bootstrap", metavar="BOOTSTRAP", help="Kafka bootstrap servers."),
        click.option("--topic", help="Kafka topic (default gpumeter.usage.v1)."),
        click.option(
            "--spool",
            "spool_dir",
            type=click.Path(file_okay=False, path_type=Path),
            help="Spool directory: windows wait here, fsync'd, until Kafka acknowledged them "
            "(default $GPUMETER_HOME/spool).",
        ),
        click.option(
            "--key-file",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Signing key: Ed25519 PEM (gpumeter agent keygen), or an older host's HMAC secret (hex); mode 0600.",
        ),
        click.option("--key-id", help="Id of the signing key (default: the key file's name)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _config(ctx: click.Context, agent_config: Path | None, **overrides: Any) -> tuple[AgentConfig, Any]:
    settings = settings_from(ctx, kafka_bootstrap=overrides.pop("kafka_bootstrap"), topic=overrides.pop("topic"))
    if agent_config is None and (settings.home / "agent.toml").exists():
        agent_config = settings.home / "agent.toml"
    given = {k: (str(v) if isinstance(v, Path) else v) for k, v in overrides.items()}
    return load_agent_config(agent_config, **given), settings


@agent.command("run")
@_agent_options
@click.option("--simulate", type=click.IntRange(min=1), metavar="N", help="Meter N simulated GPUs instead of NVML.")
@click.option("--interval", "interval_s", type=click.IntRange(min=1), help="Seconds between samples [1].")
@click.option("--window", "window_s", type=click.IntRange(min=1), help="Window length in seconds [60].")
@click.option("--provider", "provider_id", help="Provider id of this host [P01].")
@click.option("--host-id", help="Host id (default: the machine's hostname).")
@click.option("--spool-max-bytes", type=click.IntRange(min=4096), help="Spool bound [256 MiB].")
@click.option("--metrics-textfile", type=click.Path(dir_okay=False, path_type=Path), help="Prometheus textfile.")
@click.option("--metrics-port", type=click.IntRange(min=1, max=65535), help="Serve /metrics on this port.")
@click.option("--duration", type=float, default=None, help="Stop after this many seconds (default: run until stopped).")
@click.option("--sim-seed", type=int, help="Simulation: fleet seed (default: from the host id).")
@click.option("--sim-start", type=int, help="Simulation: fleet epoch, Unix seconds (default: this UTC month).")
@click.option("--sim-days", type=click.IntRange(min=1), default=35, show_default=True, help="Simulation: days of jobs.")
@click.option("--sim-mean-job", type=click.IntRange(min=1), default=3 * 3600, show_default=True,
              help="Simulation: mean job length in seconds.")  # fmt: skip
@click.pass_context
def run(
    ctx: click.Context,
    /,
    agent_config: Path | None,
    simulate: int | None,
    duration: float | None,
    sim_seed: int | None,
    sim_start: int | None,
    sim_days: int,
    sim_mean_job: int,
    **flags: Any,
) -> None:
    """Sample GPUs every --interval seconds, close --window windows, spool them durably, send them to
    Kafka (acks=all). Without --simulate the GPUs are read through NVML.

    \b
    Examples:
      gpumeter agent run --key-file /etc/gpumeter/keys/host.key
      gpumeter agent run --simulate 8 --interval 1 --kafka 127.0.0.1:9092 --spool /tmp/spool --duration 120
    """
    cfg, settings = _config(ctx, agent_config, **flags)
    if cfg.window_s % cfg.interval_s:
        raise click.BadParameter(f"--window ({cfg.window_s}) must be a multiple of --interval ({cfg.interval_s})")
    json_logging(logging.INFO)
    sim = None
    if simulate is not None:
        month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        sim = SimSpec(
            gpus=simulate,
            seed=zlib.crc32(cfg.host.encode()) if sim_seed is None else sim_seed,
            start_s=int(month.timestamp()) if sim_start is None else sim_start,
            days=sim_days,
            mean_job_s=sim_mean_job,
        )
    security = settings.kafka_security()  # a bad TLS/SASL setting stops here, before anything is made
    should_stop = stop_requested()
    meter, spool, sender = run_agent(
        cfg, settings.kafka_bootstrap, settings.topic, sim, duration, should_stop, settings.home, security
    )
    click.echo(
        f"samples={meter.samples} windows={meter.windows_closed} gpu_windows={meter.gpu_windows_closed} "
        f"windows_sent={sender.windows_sent} "
        f"windows_spooled={spool.depth_windows} windows_dropped={spool.windows_dropped}",
        file=sys.stderr,
    )


def _check_kafka(settings: Any) -> tuple[bool, str]:
    """The broker check, or why the TLS/SASL settings do not make sense (a line like the others)."""
    from agent import checks
    from gpumeter.errors import ConfigError

    try:
        security = settings.kafka_security()
    except ConfigError as exc:
        return False, str(exc)
    return checks.check_kafka(settings.kafka_bootstrap, settings.topic, security=security)


@agent.command("check")
@_agent_options
@click.pass_context
def check(ctx: click.Context, /, agent_config: Path | None, **flags: Any) -> None:
    """Check this host can meter: NVML and its GPUs, the Kafka broker and topic, the spool, the
    signing key, the clock. One verdict per line; exit code 1 if any check fails.

    \b
    Example:
      gpumeter agent check --kafka kafka:9092 --key-file /etc/gpumeter/keys/host.key
    """
    from agent import checks  # here, not at import: `agent run` never loads the Kafka admin client

    cfg, settings = _config(ctx, agent_config, **flags)
    spool_dir = Path(cfg.spool_dir) if cfg.spool_dir else settings.home / "spool"
    verdicts = [
        ("nvml", checks.check_nvml()),
        ("kafka", _check_kafka(settings)),
        ("spool", checks.check_spool(spool_dir, cfg.spool_max_bytes)),
        ("key", checks.check_key(cfg)),
        ("clock", checks.check_clock()),
    ]
    for name, verdict in verdicts:
        click.echo(checks.line(name, verdict))
    failed = [name for name, (ok, _) in verdicts if not ok]
    if failed:
        raise checks.ChecksFailed(f"{len(failed)} of {len(verdicts)} checks failed: {', '.join(failed)}")


@agent.command("keygen")
@click.argument("key_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--host", "host_id", default=None, help="This host's id, for the registration line printed.")
@click.option("--provider", "provider_id", default=None, help="Its provider's id, for the same line.")
def keygen(key_file: Path, host_id: str | None, provider_id: str | None) -> None:
    """Make this host's signing key pair: the private key stays in KEY_FILE (0600, never overwritten),
    the public key is printed for the pipeline's registry (`gpumeter keys new` or `keys rotate`).

    \b
    Example:
      gpumeter agent keygen /etc/gpumeter/agent.key --host P01-H01 --provider P01
    """
    key = new_key_file(key_file)
    public = public_key_text(key.public_key())
    click.echo(f"wrote {key_file} (Ed25519 private key, mode 0600); its public key:")
    click.echo(public)
    host, provider = host_id or "HOST_ID", provider_id or "PROVIDER_ID"
    click.echo("register it where the loader runs (first key of a host; `keys rotate` for its next one):", err=True)
    click.echo(f"  gpumeter keys new --host {host} --provider {provider} --public-key {public}", err=True)


def _valid_from(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    from agent.inventory import parse_hour

    try:
        return None if value is None else parse_hour(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@agent.command("inventory")
@_agent_options
@click.option(
    "--valid-from",
    metavar="TIME",
    callback=_valid_from,
    help="Start of the rows' period: ISO-8601 UTC on a whole hour (default: the start of this hour).",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the rows to FILE (replaced whole: temp file, then rename) instead of stdout.",
)
@click.pass_context
def inventory(
    ctx: click.Context, /, agent_config: Path | None, valid_from: datetime | None, output: Path | None, **flags: Any
) -> None:
    """Print this host's rows of the fleet registry, read through NVML: header line, then one row per
    metered GPU (a GPU in MIG mode as its instances, with parent_uuid), sorted by gpu_uuid. Provider,
    host, window and class overrides come from the agent config, as `agent run` uses them; valid_to
    stays empty. Paste the rows into the fleet file instead of typing GPU UUIDs.

    \b
    Example:
      gpumeter agent inventory --agent-config /etc/gpumeter/agent.toml --valid-from 2026-12-02T03:00:00Z
    """
    from agent import inventory as inv

    cfg, _ = _config(ctx, agent_config, **flags)
    start = valid_from or inv.hour_start(datetime.now(UTC))
    text = inv.render(inv.inventory_rows(inv.read_devices(), cfg, start))
    if output is None:
        click.echo(text, nl=False)
    else:
        inv.write_output(output, text)
