"""The agent loop: sample a DeviceSource, integrate windows, send them.

Time comes in from outside (``sample(now_s)``): the real-time loop passes the
wall clock; the demo and tests drive a simulated month as fast as they can.

With a ``checkpoint`` (the spool, on a real host) the order at every sample is:
1. integrate the sample; 2. hand closed windows to the sink, which makes them
durable (fsync) before returning; 3. save the open windows and ``next_seq``
(fsync'd when windows closed). A kill -9 anywhere leaves either the closed
windows on disk or the open ones in the checkpoint, never neither; ``stop()``
then saves open windows instead of closing them early, so a window is only ever
closed once, at its end, and a re-emitted window is byte-identical.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from agent import AGENT_VERSION
from agent.devices import DeviceSource, Observation
from agent.windows import HostIdentity, WindowAccumulator
from gpumeter.record import GpuWindow, UsageWindow


class Sink(Protocol):
    def send(
        self, host_id: str, agent_version: str, windows: list[UsageWindow], gpu_windows: list[GpuWindow]
    ) -> None: ...


class Checkpoint(Protocol):
    def load(self) -> dict[str, Any] | None:
        """The last saved accumulator snapshot, reconciled with what is already durable."""
        ...

    def save(self, snapshot: dict[str, Any], sync: bool) -> None: ...


class Agent:
    def __init__(
        self,
        source: DeviceSource,
        identity: HostIdentity,
        sink: Sink,
        window_s: int = 60,
        interval_s: int = 1,
        batch_windows: int = 1,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        self.source = source
        self.identity = identity
        self.sink = sink
        self.checkpoint = checkpoint
        self.samples = 0
        self.windows_closed = 0
        self.gpu_windows_closed = 0
        self._pending: list[UsageWindow] = []
        self._pending_gpu: list[GpuWindow] = []
        snap = checkpoint.load() if checkpoint else None
        if checkpoint is not None and batch_windows != 1:
            raise ValueError("with a checkpoint every closed window goes to the sink at once (batch_windows=1)")
        self.batch_windows = batch_windows
        self.acc = WindowAccumulator(identity, source.devices(), window_s, interval_s)
        if snap is not None and "gpus" not in snap:
            self.acc.next_seq = int(snap["next_seq"])  # nothing was open; the sequence carries on
        elif snap is not None:
            old = WindowAccumulator.restore(identity, snap)
            if (old.window_s, old.interval_s) == (window_s, interval_s):
                self.acc = old
                for info in source.devices():
                    self.acc.add_device(info)
            else:  # the cadence changed: close what was open under the old one (the rest of it unsampled),
                # keep the sequence, sample again from the first new window after it; the time between
                # is in no GPU window (pipeline coverage reports it)
                self.acc.resume_at(old.accounted_through_s())
                self._pending.extend(old.flush())
                self._pending_gpu.extend(old.take_gpu_windows())
                self.windows_closed += len(self._pending)
                self.gpu_windows_closed += len(self._pending_gpu)
                self.acc.next_seq = old.next_seq
                self._send()

    def sample(self, now_s: int) -> None:
        observations = self.source.observe(now_s)
        self._register(observations)
        # a GPU the accumulator meters that the source did not answer for (restored from the
        # checkpoint but not found at start, say): a missed sample, so its open window still closes
        seen = {o.gpu_uuid for o in observations}
        observations = observations + [
            Observation(u, None, None, None, missed=True) for u in self.acc.gpus() if u not in seen
        ]
        closed = self.acc.add(now_s, observations)
        gpu_closed = self.acc.take_gpu_windows()
        self.samples += 1
        if closed or gpu_closed:
            self.windows_closed += len(closed)
            self.gpu_windows_closed += len(gpu_closed)
            self._pending.extend(closed)
            self._pending_gpu.extend(gpu_closed)
            if len(self._pending) + len(self._pending_gpu) >= self.batch_windows:
                self._send()  # durable before the checkpoint forgets them
        if self.checkpoint is not None:
            self.checkpoint.save(self.acc.snapshot(), sync=bool(closed or gpu_closed))

    def stop(self) -> None:
        """Without a checkpoint: close open windows and send everything. With one: save them."""
        if self.checkpoint is not None:
            self._send()
            self.checkpoint.save(self.acc.snapshot(), sync=True)
            return
        closed = self.acc.flush()
        self.windows_closed += len(closed)
        self._pending.extend(closed)
        gpu_closed = self.acc.take_gpu_windows()
        self.gpu_windows_closed += len(gpu_closed)
        self._pending_gpu.extend(gpu_closed)
        self._send()

    def _register(self, observations: list[Observation]) -> None:
        if any(not self.acc.knows(o.gpu_uuid) for o in observations):
            for info in self.source.devices():
                self.acc.add_device(info)

    def _send(self) -> None:
        if self._pending or self._pending_gpu:
            self.sink.send(self.identity.host_id, AGENT_VERSION, self._pending, self._pending_gpu)
            self._pending, self._pending_gpu = [], []


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
    agent: Agent,
    interval_s: int,
    duration_s: float | None,
    should_stop: Callable[[], bool] = lambda: False,
    after_sample: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Sample on wall-clock multiples of interval_s until duration_s passes or should_stop().

    A tick that comes late (a busy host, a slow sample, a sleep that ended late) is sampled at
    once, as itself; when the clock is already past the tick after it, the latest due tick is
    sampled and the ones between are a gap the accumulator accounts as not sampled
    (``WindowAccumulator._not_sampled``, and the GPU windows' ``unsampled_seconds``)."""
    deadline = None if duration_s is None else clock() + duration_s
    tick: int | None = None
    while not should_stop() and (deadline is None or clock() < deadline):
        now = clock()
        if tick is not None and now < tick:  # the clock stepped back: go on from where it is now (the
            tick = None  # accumulator refuses instants already counted), never sleep out the step
        target = (int(now) // interval_s + 1) * interval_s if tick is None else tick + interval_s
        if now < target:
            sleep(target - now)
            now = clock()  # a sleep can end late (the process was stopped, a busy host): see below
        # the latest tick due: one woken (or come) more than a tick late samples now as now, and the
        # ticks between are a gap, never the state of now passed off as an instant long gone
        tick = max(target, int(now) // interval_s * interval_s)
        if should_stop():
            break
        agent.sample(tick)
        if after_sample is not None:
            after_sample(tick)
    agent.stop()
