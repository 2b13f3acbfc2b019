"""Graceful stop for long-running commands (agent, loader)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType


def stop_requested() -> Callable[[], bool]:
    """Install SIGTERM/SIGINT handlers; the returned callable says whether one arrived."""
    stopping = False

    def _stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return lambda: stopping
