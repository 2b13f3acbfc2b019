"""Agent cost on a host: CPU (% of one core) and peak RSS at 1 Hz with 8 simulated GPUs over 65 s.

Runs ``gpumeter agent run --simulate 8 --interval 1 --duration 65`` against a
local broker, spool on disk, every batch signed with an Ed25519 key (as shipped),
and samples the process with psutil. Beside it, a
baseline: a bare Python process that imports the same libraries and sleeps, so
``vs baseline`` is the cost of metering itself over the interpreter's floor.
Target: at most 0.5 % of a core and 50 MB RSS.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from gpumeter.demo.broker import LocalBroker, create_topic

DURATION_S = 65
WARMUP_S = 5  # start-up (imports, fleet generation) is not the steady state
GPUMETER = Path(sys.executable).with_name("gpumeter")
BASELINE = (
    "import time, agent.cli, agent.service, agent.kafka_sink, agent.simulate, kafka, fastavro, psutil, cryptography\n"
    f"time.sleep({DURATION_S + 5})\n"
)


def _watch(procs: dict[str, psutil.Process], seconds: float) -> dict[str, tuple[float, float]]:
    """(cpu % of one core over the steady window, peak RSS MB) per process."""
    time.sleep(WARMUP_S)
    t0 = time.monotonic()
    cpu0 = {n: sum(p.cpu_times()[:2]) for n, p in procs.items()}
    peak = dict.fromkeys(procs, 0.0)
    while time.monotonic() - t0 < seconds - WARMUP_S - 1:
        for n, p in procs.items():
            peak[n] = max(peak[n], p.memory_info().rss / 2**20)
        time.sleep(0.5)
    elapsed = time.monotonic() - t0
    return {n: (100 * (sum(p.cpu_times()[:2]) - cpu0[n]) / elapsed, peak[n]) for n, p in procs.items()}


def run() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as tmp, LocalBroker(log_path=Path(tmp) / "broker.log") as broker:
        create_topic(broker.bootstrap, "bench-agent", partitions=1)
        key = Path(tmp) / "host.key"
        subprocess.run([str(GPUMETER), "agent", "keygen", str(key)], check=True, capture_output=True)
        agent = subprocess.Popen(
            [str(GPUMETER), "agent", "run", "--simulate", "8", "--interval", "1", "--duration", str(DURATION_S),
             "--kafka", broker.bootstrap, "--topic", "bench-agent", "--spool", f"{tmp}/spool", "--key-file", str(key)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={"GPUMETER_HOME": tmp, "PATH": ""},
        )  # fmt: skip
        base = subprocess.Popen([sys.executable, "-c", BASELINE])
        try:
            got = _watch({"agent": psutil.Process(agent.pid), "base": psutil.Process(base.pid)}, DURATION_S)
            _, err = agent.communicate(timeout=60)
        finally:
            base.kill()
            base.wait()
        if agent.returncode != 0:
            raise RuntimeError(f"agent exited {agent.returncode}: {err[-2000:]}")
    (cpu, rss), (base_cpu, base_rss) = got["agent"], got["base"]
    # The idle baseline's CPU is ~0, so a CPU ratio would mean nothing: the absolute figure is the one to
    # read (target <= 0.5 % of a core). The RSS ratio says what the agent adds to the interpreter.
    yield f"BENCH agent_cpu_percent {cpu:.3f} %"
    yield f"BENCH agent_rss_mb {rss:.1f} MB vs bare_python_imports {rss / base_rss:.2f}x"
    print(f"# agent run: {err.strip().splitlines()[-1]} (baseline cpu {base_cpu:.3f} %)", file=sys.stderr)


if __name__ == "__main__":
    for line in run():
        print(line, flush=True)
