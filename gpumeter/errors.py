"""Small exception classes with stable codes; only the CLI turns them into messages."""

from __future__ import annotations


class GpumeterError(Exception):
    """Base class: ``code`` is stable and machine-readable, the message is for people; ``exit_code``
    is the process's exit status when the CLI reports it."""

    code = "error"
    exit_code = 1


class ConfigError(GpumeterError):
    code = "config"


class MissingExtraError(GpumeterError):
    """A command needs an optional part that this install does not have."""

    code = "missing_extra"

    def __init__(self, extra: str, module: str) -> None:
        super().__init__(
            f"this command needs the '{extra}' extra (module '{module}' is not installed); "
            f"install it with: pip install 'gpumeter[{extra}]'"
        )


class RecordError(GpumeterError):
    """A Kafka message or usage record that cannot be decoded or fails validation."""

    code = "bad_record"


class StoreBusyError(GpumeterError):
    """The embedded ClickHouse store is held by another process."""

    code = "store_busy"
