"""The ``gpumeter`` command. Groups load lazily, so a GPU host with only the base
install runs ``gpumeter agent`` without ClickHouse; a group whose extra is missing
says which extra to install."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import click

from gpumeter import __version__
from gpumeter.errors import GpumeterError, MissingExtraError
from gpumeter.files import PRIVATE_UMASK
from gpumeter.redact import RedactFilter, redact
from gpumeter.settings import Settings, load_settings

# name -> (module:attribute, extra that provides its dependencies, one-line help)
GROUPS: dict[str, tuple[str, str, str]] = {
    "agent": ("agent.cli:agent", "base", "Meter GPUs on this host and send usage windows to Kafka."),
    "pipeline": ("pipeline.cli:pipeline", "pipeline", "Load usage from Kafka into ClickHouse, exactly once."),
    "usage": ("pipeline.usage_cli:usage", "pipeline", "Inspect and import usage in ClickHouse."),
    "keys": ("pipeline.keys_cli:keys", "pipeline", "The keys hosts sign their usage with: add, rotate, revoke, list."),
    "fleet": ("pipeline.fleet_cli:fleet", "pipeline", "The fleet registry: which GPUs each provider has."),
    "billing": (
        "billing.cli:billing",
        "billing",
        "Rate cards, vouchers, monthly settlement, invoices, payments.",
    ),
    "statement": ("billing.cli:statement", "billing", "A firm's monthly usage statement (HTML or CSV)."),
    "demo": ("gpumeter.demo.cli:demo", "embedded", "Run a simulated city compute platform end to end."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(GROUPS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in GROUPS:
            return None
        target, extra, short = GROUPS[cmd_name]
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or "?"
            return _missing(cmd_name, extra, missing, short)
        command: click.Command = getattr(module, attr)
        return command


def _missing(name: str, extra: str, module: str, short: str) -> click.Command:
    @click.command(
        name,
        help=f"{short}\n\n(Not installed: needs the '{extra}' extra.)",
        short_help=short,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )
    def stub() -> None:
        raise MissingExtraError(extra, module)

    return stub


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="gpumeter")
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Config file (default: $GPUMETER_HOME/config.toml if it exists).",
)
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.pass_context
def cli(ctx: click.Context, config: Path | None, verbose: int) -> None:
    """gpumeter: metering and billing for pooled GPU compute.

    \b
    Data locations come from the environment (or the config file):
      GPUMETER_HOME                 embedded stores live here (default ~/.gpumeter)
      GPUMETER_KAFKA_BOOTSTRAP      Kafka bootstrap servers (default 127.0.0.1:9092)
      GPUMETER_CLICKHOUSE_DSN       chdb:///path (embedded) or http://host:8123 (server)
      GPUMETER_CLICKHOUSE_DATABASE  database name (default gpumeter)
      GPUMETER_BILLING_DB           sqlite:///path or postgresql://... (default: SQLite in GPUMETER_HOME)
    """
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if level < logging.INFO:  # -vv: kafka-python logs each request, SASL handshakes and its config among them
        for name in ("kafka.net.connection", "kafka.conn", "kafka.admin.client"):
            logging.getLogger(name).setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:  # no password of a DSN in any log line
        if not any(isinstance(f, RedactFilter) for f in handler.filters):
            handler.addFilter(RedactFilter())
    ctx.obj = {"config": config}


def settings_from(ctx: click.Context, **overrides: Any) -> Settings:
    """Settings for a subcommand: defaults < config file < environment < flags."""
    root = ctx.find_root()
    config = root.obj.get("config") if root.obj else None
    return load_settings(config=config, **overrides)


def main(argv: list[str] | None = None) -> None:
    # every file gpumeter makes - spool, state, keys, SQLite, the embedded ClickHouse, exports - is
    # its user's alone (0600 files, 0700 directories); share an export by copying it
    os.umask(PRIVATE_UMASK)
    try:
        rc = cli.main(args=argv, prog_name="gpumeter", standalone_mode=False)
        if isinstance(rc, int) and rc:  # a command that ended with ctx.exit(n)
            sys.exit(rc)
    except GpumeterError as exc:
        click.echo(redact(f"Error: {exc}"), err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.message = redact(exc.message)  # type: ignore[misc]  # a BadParameter can quote a DSN given as a flag
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        if isinstance(exc, OSError) or any(c.__name__ == "OperationalError" for c in type(exc).__mro__):
            # the machine or a database said no (a file not readable, a server away, a store locked)
            click.echo(redact(f"Error: {exc}"), err=True)
            sys.exit(1)
        # a bug: said plainly; the traceback goes to a file, and to the terminal with -vv
        fd, crash = tempfile.mkstemp(prefix="gpumeter-crash-", suffix=".txt")
        with os.fdopen(fd, "w") as out:
            out.write(redact(traceback.format_exc()))
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            click.echo(redact(traceback.format_exc()), err=True)
        click.echo(
            f"Error: unexpected {type(exc).__name__}: {redact(str(exc))}\n"
            f"This is a bug in gpumeter; please report it with the traceback saved in {crash}",
            err=True,
        )
        sys.exit(70)  # EX_SOFTWARE


if __name__ == "__main__":  # pragma: no cover
    main()
