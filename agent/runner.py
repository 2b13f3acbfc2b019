"""The agent loop: sample a DeviceSource, integrate windows, send them.

Time comes in from outside (``sample(now_s)``): the real-time loop passes the
wall clock; the demo and tests drive a simulated month as fast as they can.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from agent import AGENT_VERSION
from agent.devices import DeviceSource
from agent.windows import HostIdentity, WindowAccumulator
from gpumeter.record import Window


class Sink(Protocol):
    def send(self, host_id: str, agent_version: str, windows: list[Window]) -> None: ...


class Agent:
    def __init__(
        self,
        source: DeviceSource,
        identity: HostIdentity,
        sink: Sink,
        window_s: int = 60,
        interval_s: int = 1,
        batch_windows: int = 1,
    ) -> None:
        self.source = source
        self.identity = identity
        self.sink = sink
        self.acc = WindowAccumulator(identity, source.devices(), window_s, interval_s)
        self.batch_windows = batch_windows
        self._pending: list[Window] = []
        self.samples = 0
        self.windows_closed = 0

    def sample(self, now_s: int) -> None:
        closed = self.acc.add(now_s, self.source.observe(now_s))
        self.samples += 1
        if closed:
            self.windows_closed += len(closed)
            self._pending.extend(closed)
            if len(self._pending) >= self.batch_windows:
                self._send()

    def stop(self) -> None:
        """Close open windows and hand everything to the sink."""
        closed = self.acc.flush()
        self.windows_closed += len(closed)
        self._pending.extend(closed)
        self._send()

    def _send(self) -> None:
        if self._pending:
            self.sink.send(self.identity.host_id, AGENT_VERSION, self._pending)
            self._pending = []


def run_simulated(
    agents: list[Agent],
    start_s: int,
    end_s: int,
    interval_s: int,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Drive agents through [start_s, end_s) in simulated time, as fast as possible."""
    t = start_s
    step = 0
    while t < end_s:
        for agent in agents:
            agent.sample(t)
        t += interval_s
        step += 1
        if progress is not None and step % 10_000 == 0:
            progress(t)
    for agent in agents:
        agent.stop()


def run_realtime(
    agent: Agent, interval_s: int, duration_s: float | None, should_stop: Callable[[], bool] = lambda: False
) -> None:
    """Sample on wall-clock multiples of interval_s until duration_s passes or should_stop()."""
    deadline = None if duration_s is None else time.time() + duration_s
    while not should_stop() and (deadline is None or time.time() < deadline):
        now = time.time()
        next_tick = (int(now) // interval_s + 1) * interval_s
        time.sleep(max(0.0, next_tick - now))
        agent.sample(next_tick)
    agent.stop()
