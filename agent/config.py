"""The agent's own settings: a TOML file (top-level keys or an ``[agent]`` table), overridden by flags.

Kafka bootstrap and topic are the shared gpumeter settings (flag > env >
config.toml > default), not repeated here. Also: the signing key file and JSON
log lines.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.spool import DEFAULT_MAX_BYTES
from gpumeter.errors import ConfigError
from gpumeter.files import check_owner_only
from gpumeter.record import SigningKey, public_key_text
from gpumeter.redact import redact

MIN_KEY_BYTES = 32


@dataclass(frozen=True, slots=True)
class AgentConfig:
    provider_id: str = "P01"
    host_id: str = ""  # "" means the machine's hostname
    interval_s: int = 1
    window_s: int = 60
    spool_dir: str = ""  # "" means $GPUMETER_HOME/spool
    spool_max_bytes: int = DEFAULT_MAX_BYTES
    key_file: str = ""
    key_id: str = ""  # "" means the key file's name without suffix
    metrics_textfile: str = ""
    metrics_port: int = 0  # 0: no HTTP endpoint
    metrics_addr: str = "127.0.0.1"  # the endpoint has no authentication: this host only, unless told
    send_retry_max_s: float = 10.0
    gpu_classes: dict[str, str] = field(default_factory=dict)  # device name or UUID -> rate-card class
    attribution: dict[str, Any] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return self.host_id or socket.gethostname()


# the least each number may be, as the flags' ranges say (a zero interval would divide by zero)
MINIMUM: dict[str, float] = {"interval_s": 1, "window_s": 1, "spool_max_bytes": 4096, "send_retry_max_s": 0.001}
# the fleet registry changes on whole hours (gpumeter/fleet.py): a window must never straddle one
HOUR_S = 3600
_WINDOW_RULE = "must divide 3600 so windows never straddle an hour (e.g. 60, 300, 600, 3600)"

ATTRIBUTION_KEYS = {
    "order": list,  # of "kubernetes", "slurm", "static", "env" (default: the first three)
    "env_var": str,
    "host_firm": str,
    "gpu_firms": dict,
    "pod_firms_file": str,
    "slurm_job_firms_file": str,
    "slurm_account_firms": dict,
    "slurm_job_accounts_file": str,  # {job_id: account}, kept by the Slurm prolog/epilog (trusted)
    "slurm_account_from_env": bool,  # the job's SLURM_JOB_ACCOUNT instead (untrusted)
    "proc_root": str,
}


def load_agent_config(path: Path | None, **overrides: Any) -> AgentConfig:
    """Defaults < file < flags (None means 'not given')."""
    cfg = AgentConfig()
    if path is not None:
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{path}: agent config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        if "agent" in data:
            beside = sorted(set(data) - {"agent"})
            if beside:  # they would be ignored: say so rather than run with other settings
                raise ConfigError(
                    f"{path}: setting(s) {', '.join(beside)} outside the [agent] table; "
                    "put every setting inside [agent], or use no [agent] table"
                )
            data = data["agent"]
        known = {f.name: f for f in fields(AgentConfig)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"{path}: unknown agent setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        bad_attr = sorted(set(data.get("attribution", {})) - set(ATTRIBUTION_KEYS))
        if bad_attr:
            raise ConfigError(f"{path}: unknown [attribution] setting(s) {', '.join(bad_attr)}")
        for name, value in data.items():
            want = type(getattr(cfg, name))
            if want is float and isinstance(value, int):
                value = float(value)
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise ConfigError(f"{path}: agent setting {name} must be {want.__name__}, got {value!r}")
            if name in MINIMUM and value < MINIMUM[name]:
                raise ConfigError(f"{path}: agent setting {name} must be >= {MINIMUM[name]:g}, got {value!r}")
            if name == "window_s" and HOUR_S % value:
                raise ConfigError(f"{path}: agent setting window_s {_WINDOW_RULE}, got {value!r}")
        cfg = replace(cfg, **data)
    window = overrides.get("window_s")
    if window is not None and window >= 1 and HOUR_S % window:
        raise ConfigError(f"window_s (--window) {_WINDOW_RULE}, got {window!r}")
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def read_key(path: Path) -> SigningKey:
    """The agent's signing key, from a file only its owner can read or write (0600 or stricter): an
    Ed25519 private key in PKCS#8 PEM (``gpumeter agent keygen``, or ``openssl genpkey -algorithm
    ed25519``), or for a host set up before 0.4 an HMAC secret as hex text of at least 32 bytes."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"signing key {path}: {exc.strerror or exc}") from exc
    check_owner_only(mode, f"signing key {path}", path)
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"signing key {path} is not a readable unencrypted PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"signing key {path} is a {type(key).__name__}; gpumeter signs with Ed25519 keys")
        return key
    try:
        secret = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ConfigError(
            f"signing key {path} is neither an Ed25519 PEM key nor hex text (make one with: gpumeter agent keygen)"
        ) from None
    if len(secret) < MIN_KEY_BYTES:
        raise ConfigError(f"signing key {path} has {len(secret)} bytes; at least {MIN_KEY_BYTES} are needed")
    return secret


def signing_key(cfg: AgentConfig) -> tuple[str, SigningKey] | None:
    if not cfg.key_file:
        return None
    path = Path(cfg.key_file)
    return (cfg.key_id or path.stem, read_key(path))


def describe_key(key: SigningKey) -> str:
    """What kind of key it is, for ``agent check`` and the start-up log (never the key itself)."""
    if isinstance(key, bytes):
        return f"HMAC-SHA256, {len(key)} bytes"
    return f"Ed25519, public key {public_key_text(key.public_key())}"


def new_key_file(path: Path) -> Ed25519PrivateKey:
    """A new Ed25519 key written to ``path`` (PKCS#8 PEM, 0600); ConfigError if ``path`` exists."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists; a key file is never overwritten (choose another name)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    return key


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC ISO), level, logger, msg, pid."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": os.getpid(),
        }
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out)


def json_logging(level: int = logging.INFO) -> None:
    """Structured logs on stderr: JSON formatter on the plain stderr handler; agent loggers at ``level``."""
    formatter = JsonFormatter()
    formatter.converter = time.gmtime
    root = logging.getLogger()
    plain = [h for h in root.handlers if type(h) is logging.StreamHandler]
    if not root.handlers:
        plain = [logging.StreamHandler()]
        root.addHandler(plain[0])
    for h in plain:
        h.setFormatter(formatter)
    agent_log = logging.getLogger("gpumeter.agent")
    agent_log.setLevel(min(level, logging.getLogger().getEffectiveLevel()))
