"""Where data lives and which servers to talk to.

Resolution order for every setting: command-line flag > environment variable >
config file (``$GPUMETER_HOME/config.toml`` or ``--config``) > built-in default.
The defaults are embedded: a ``chdb://`` ClickHouse under ``GPUMETER_HOME`` and a
SQLite billing store beside it; a deployment points them at servers instead.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gpumeter.errors import ConfigError

DEFAULT_TOPIC = "gpumeter.usage.v1"

# environment variable -> settings field
ENV_VARS = {
    "GPUMETER_KAFKA_BOOTSTRAP": "kafka_bootstrap",
    "GPUMETER_CLICKHOUSE_DSN": "clickhouse_dsn",
    "GPUMETER_CLICKHOUSE_DATABASE": "clickhouse_database",
    "GPUMETER_BILLING_DB": "billing_db",
    "GPUMETER_TOPIC": "topic",
}


@dataclass(frozen=True, slots=True)
class Settings:
    home: Path
    kafka_bootstrap: str = "127.0.0.1:9092"
    clickhouse_dsn: str = ""  # "" means the embedded default under home
    clickhouse_database: str = "gpumeter"
    billing_db: str = ""  # "" means sqlite under home
    topic: str = DEFAULT_TOPIC

    @property
    def clickhouse_dsn_resolved(self) -> str:
        return self.clickhouse_dsn or f"chdb://{(self.home / 'clickhouse').resolve()}"

    @property
    def billing_db_resolved(self) -> str:
        return self.billing_db or f"sqlite:///{(self.home / 'billing.sqlite3').resolve()}"


def default_home(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get("GPUMETER_HOME") or Path.home() / ".gpumeter")


def load_settings(
    config: Path | None = None,
    environ: dict[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build the settings from defaults, the config file, the environment and flags."""
    env = dict(os.environ if environ is None else environ)
    home = default_home(env)
    settings = Settings(home=home)
    path = config if config is not None else home / "config.toml"
    if config is not None and not path.exists():
        raise ConfigError(f"{path}: config file not found")
    values: dict[str, Any] = _read_config(path) if path.exists() else {}
    values.update({field: env[var] for var, field in ENV_VARS.items() if env.get(var)})
    settings = replace(settings, **values)
    given = {k: v for k, v in overrides.items() if v is not None}
    return replace(settings, **given)


def _read_config(path: Path) -> dict[str, str]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    known = set(ENV_VARS.values())
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    bad = sorted(k for k, v in data.items() if not isinstance(v, str))
    if bad:
        raise ConfigError(f"{path}: setting(s) {', '.join(bad)} must be strings")
    return {k: str(v) for k, v in data.items()}
