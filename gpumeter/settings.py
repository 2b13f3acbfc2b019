"""Where data lives and which servers to talk to.

Resolution order for every setting: command-line flag > environment variable >
config file (``$GPUMETER_HOME/config.toml`` or ``--config``) > built-in default.
The defaults are embedded: a ``chdb://`` ClickHouse under ``GPUMETER_HOME`` and a
SQLite billing store beside it; a deployment points them at servers instead.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gpumeter.errors import ConfigError
from gpumeter.files import check_owner_only

DEFAULT_TOPIC = "gpumeter.usage.v1"

# environment variable -> settings field
ENV_VARS = {
    "GPUMETER_KAFKA_BOOTSTRAP": "kafka_bootstrap",
    "GPUMETER_CLICKHOUSE_DSN": "clickhouse_dsn",
    "GPUMETER_CLICKHOUSE_DATABASE": "clickhouse_database",
    "GPUMETER_BILLING_DB": "billing_db",
    "GPUMETER_TOPIC": "topic",
    # Kafka transport security (agent, loader, dead-letter producer alike)
    "GPUMETER_KAFKA_SECURITY_PROTOCOL": "kafka_security_protocol",
    "GPUMETER_KAFKA_SSL_CAFILE": "kafka_ssl_cafile",
    "GPUMETER_KAFKA_SSL_CERTFILE": "kafka_ssl_certfile",
    "GPUMETER_KAFKA_SSL_KEYFILE": "kafka_ssl_keyfile",
    "GPUMETER_KAFKA_SASL_MECHANISM": "kafka_sasl_mechanism",
    "GPUMETER_KAFKA_SASL_USERNAME": "kafka_sasl_username",
    "GPUMETER_KAFKA_SASL_PASSWORD_FILE": "kafka_sasl_password_file",
    "GPUMETER_CLICKHOUSE_CA_FILE": "clickhouse_ca_file",
}
# read from the environment only, never from a config file: a secret's value
SECRET_ENV_VARS = {"GPUMETER_KAFKA_SASL_PASSWORD": "kafka_sasl_password"}
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")


@dataclass(frozen=True, slots=True)
class Settings:
    home: Path
    kafka_bootstrap: str = "127.0.0.1:9092"
    clickhouse_dsn: str = ""  # "" means the embedded default under home
    clickhouse_database: str = "gpumeter"
    billing_db: str = ""  # "" means sqlite under home
    topic: str = DEFAULT_TOPIC
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_ssl_cafile: str = ""  # "" means the system's CAs
    kafka_ssl_certfile: str = ""  # a client certificate (mutual TLS), with its key file
    kafka_ssl_keyfile: str = ""
    kafka_sasl_mechanism: str = "SCRAM-SHA-512"
    kafka_sasl_username: str = ""
    kafka_sasl_password_file: str = ""  # a file only its owner can read; or GPUMETER_KAFKA_SASL_PASSWORD
    kafka_sasl_password: str = field(default="", repr=False)  # from the environment only (SECRET_ENV_VARS)
    clickhouse_ca_file: str = ""  # for an https:// DSN: the CA to verify the server with ("" = system CAs)

    @property
    def clickhouse_dsn_resolved(self) -> str:
        return self.clickhouse_dsn or f"chdb://{(self.home / 'clickhouse').resolve()}"

    @property
    def billing_db_resolved(self) -> str:
        return self.billing_db or f"sqlite:///{(self.home / 'billing.sqlite3').resolve()}"

    def kafka_security(self) -> dict[str, Any]:
        """kafka-python client settings for the transport: TLS (certificate and host name verified)
        and SASL; {} for PLAINTEXT. ConfigError on a setting that does not make sense."""
        protocol = self.kafka_security_protocol.upper()
        if protocol not in SECURITY_PROTOCOLS:
            raise ConfigError(
                f"kafka_security_protocol {self.kafka_security_protocol!r}: one of {', '.join(SECURITY_PROTOCOLS)}"
            )
        tls_given = [n for n in ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile") if getattr(self, n)]
        sasl_given = self.kafka_sasl_username or self.kafka_sasl_password or self.kafka_sasl_password_file
        if protocol == "PLAINTEXT":
            if tls_given or sasl_given:
                given = ", ".join(tls_given + (["kafka_sasl_*"] if sasl_given else []))
                raise ConfigError(f"{given} set but kafka_security_protocol is PLAINTEXT: set it to SSL or SASL_SSL")
            return {}
        out: dict[str, Any] = {"security_protocol": protocol}
        if protocol in ("SSL", "SASL_SSL"):
            out["ssl_check_hostname"] = True
            for name, key in (("kafka_ssl_cafile", "ssl_cafile"), ("kafka_ssl_certfile", "ssl_certfile"),
                              ("kafka_ssl_keyfile", "ssl_keyfile")):  # fmt: skip
                value = getattr(self, name)
                if value:
                    if not Path(value).is_file():
                        raise ConfigError(f"{name} {value}: no such file")
                    out[key] = value
            if bool(self.kafka_ssl_certfile) != bool(self.kafka_ssl_keyfile):
                raise ConfigError(
                    "kafka_ssl_certfile and kafka_ssl_keyfile go together (a client certificate and its key)"
                )
        elif tls_given:
            raise ConfigError(f"{', '.join(tls_given)} set but kafka_security_protocol is {protocol}: use SASL_SSL")
        if protocol.startswith("SASL"):
            mechanism = self.kafka_sasl_mechanism.upper()
            if mechanism not in SASL_MECHANISMS:
                raise ConfigError(
                    f"kafka_sasl_mechanism {self.kafka_sasl_mechanism!r}: one of {', '.join(SASL_MECHANISMS)}"
                )
            if mechanism == "PLAIN" and protocol == "SASL_PLAINTEXT":
                raise ConfigError("SASL PLAIN over SASL_PLAINTEXT sends the password in clear: use SASL_SSL or SCRAM")
            if not self.kafka_sasl_username:
                raise ConfigError(f"kafka_security_protocol {protocol} needs kafka_sasl_username")
            out.update(sasl_mechanism=mechanism, sasl_plain_username=self.kafka_sasl_username,
                       sasl_plain_password=self._sasl_password())  # fmt: skip
        elif sasl_given:
            raise ConfigError(f"kafka_sasl_* set but kafka_security_protocol is {protocol}: use SASL_SSL")
        return out

    def _sasl_password(self) -> str:
        if self.kafka_sasl_password:
            return self.kafka_sasl_password
        if not self.kafka_sasl_password_file:
            raise ConfigError("SASL needs a password: kafka_sasl_password_file, or GPUMETER_KAFKA_SASL_PASSWORD")
        path = Path(self.kafka_sasl_password_file)
        try:
            st = path.stat()
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"kafka_sasl_password_file {path}: {getattr(exc, 'strerror', None) or exc}") from None
        check_owner_only(st.st_mode, f"kafka_sasl_password_file {path}", path)
        if not text:
            raise ConfigError(f"kafka_sasl_password_file {path} is empty")
        return text


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
    values.update({field: env[var] for var, field in {**ENV_VARS, **SECRET_ENV_VARS}.items() if env.get(var)})
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
