"""The real pynvml ctypes path, against a stand-in libnvidia-ml.so.1 built here with gcc.

pynvml loads ``CDLL("libnvidia-ml.so.1")`` with no search path of its own and the
loader reads LD_LIBRARY_PATH at process start, so each test runs a child process.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import pynvml
import pytest

# a real process (the CLI) loads a compiled stand-in driver through the real pynvml: not a unit test
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "tests" / "fakenvml" / "fake_nvml.c"
GPUMETER = Path(sys.executable).with_name("gpumeter")


@pytest.fixture(scope="module")
def fake_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not found: cannot build the stand-in libnvidia-ml.so.1")
    out = tmp_path_factory.mktemp("fakenvml")
    subprocess.run([gcc, "-Wall", "-Werror", "-shared", "-fPIC", "-o", str(out / "libnvidia-ml.so.1"), str(SOURCE)],
                   check=True)  # fmt: skip
    return out


def child_env(lib_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, LD_LIBRARY_PATH=str(lib_dir), **extra)
    return env


PROBE = """
import json, time
from agent import attribution as a
from agent.nvml import Nvml
from agent.nvml_source import NvmlSource
nvml = Nvml()
src = NvmlSource(nvml, a.chain(a.env_var(a.ProcReader())), interval_s=1)
now = int(time.time())
first, second = src.observe(now), src.observe(now + 1)
print(json.dumps({
    "devices": [[d.gpu_uuid, d.gpu_class] for d in src.devices()],
    "first": [[o.gpu_uuid, o.firm_id, o.util_percent, o.energy_mj_total, o.missed] for o in first],
    "second_energy": second[0].energy_mj_total,
    "errors": dict(nvml.errors),
}))
"""


def test_pinned_pynvml_has_the_24_byte_process_entry_the_v3_symbol_expects() -> None:
    """nvitop#75: a struct that does not match the symbol's layout reads garbage pids, not an error."""
    assert metadata.version("nvidia-ml-py") == "13.615.71"
    assert ctypes.sizeof(pynvml.c_nvmlProcessInfo_v3_t) == 24
    assert [f[0] for f in pynvml.c_nvmlProcessInfo_v3_t._fields_] == [
        "pid", "usedGpuMemory", "gpuInstanceId", "computeInstanceId"
    ]  # fmt: skip


def test_real_pynvml_path_reads_uuid_samples_energy_processes_and_a_lost_gpu(fake_lib: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", PROBE], env=child_env(fake_lib, GPUMETER_FIRM="F-REAL"),
                          capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    gpu0, gpu1 = "GPU-fake0000-0000-0000-0000-000000000000", "GPU-fake0000-0000-0000-0000-000000000001"
    assert got["devices"] == [[gpu0, "H100-80G"], [gpu1, "L40S-48G"]]
    # GPU 0: the child's own pid runs on it, its environment names the firm; util = mean of samples (60, 80)
    assert got["first"][0] == [gpu0, "F-REAL", 70.0, 5_001_000, False]
    assert got["second_energy"] == 5_002_000
    # GPU 1: the process list says "GPU is lost": missed, nobody billed
    assert got["first"][1] == [gpu1, None, None, None, True]
    assert got["errors"]["gpu_lost"] == 1
    assert "GPU GPU-fake0000-0000-0000-0000-000000000001 lost" in proc.stderr


def test_agent_check_lists_the_gpus_through_nvml(fake_lib: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(GPUMETER), "agent", "check", "--kafka", "127.0.0.1:1", "--spool", str(tmp_path / "spool")],
        env=child_env(fake_lib, GPUMETER_HOME=str(tmp_path)), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    lines = proc.stdout.splitlines()
    assert lines[0] == (
        "ok    nvml: 2 GPU(s): GPU-fake0000-0000-0000-0000-000000000000 (H100-80G), "
        "GPU-fake0000-0000-0000-0000-000000000001 (L40S-48G)"
    )
    assert lines[1].startswith("FAIL  kafka: 127.0.0.1:1 not reachable")
    assert proc.returncode == 1


# the stand-in driver's scenario controls, for the child scripts below
DRIVER = """
import ctypes, json, sys
lib = ctypes.CDLL("libnvidia-ml.so.1")  # the library pynvml loads: the same handle
lib.fakeNvmlSetTime.argtypes = [ctypes.c_ulonglong]
lib.fakeNvmlSetLost.argtypes = [ctypes.c_int]
lib.fakeNvmlAddJob.argtypes = [ctypes.c_ulonglong, ctypes.c_ulonglong, ctypes.c_uint, ctypes.c_uint]
lib.fakeNvmlSetJobMemory.argtypes = [ctypes.c_int, ctypes.c_ulonglong]
def add_jobs(t0, jobs):  # (start s, end s, pid, util %[, memory GiB])
    lib.fakeNvmlSetTime(t0 * 1_000_000)
    for start, end, pid, util, *memory in jobs:
        job = lib.fakeNvmlAddJob(start * 1_000_000, end * 1_000_000, pid, util)
        if memory:
            lib.fakeNvmlSetJobMemory(job, memory[0] << 30)
"""

SCENARIO = (
    DRIVER
    + """
from agent.nvml import Nvml
from agent.nvml_source import NvmlSource
from agent.runner import Agent
from agent.windows import HostIdentity
jobs, firms, t0, t1, lost = json.loads(sys.argv[1])
add_jobs(t0, jobs)
class Sink:
    windows = []
    gpu_windows = []
    def send(self, host, version, windows, gpu_windows):
        self.windows += windows
        self.gpu_windows += gpu_windows
src = NvmlSource(Nvml(), lambda pid, gpu: firms[str(pid)], interval_s=1, rediscover_s=0)
meter = Agent(src, HostIdentity("P01", "h1"), Sink(), window_s=10, interval_s=1)
for t in range(t0, t1):
    lib.fakeNvmlSetTime(t * 1_000_000)
    lib.fakeNvmlSetLost(int(lost[0] <= t < lost[1]))
    meter.sample(t)
parts = ("allocated_seconds", "unattributed_seconds", "idle_seconds", "unread_seconds", "unsampled_seconds")
gpu = [[g["gpu_uuid"][-1], g["window_start"] // 1000 - t0, *(g[k] for k in parts)] for g in Sink.gpu_windows]
print(json.dumps([[w for w in Sink.windows if w["gpu_uuid"].endswith("0")], gpu]))
"""
)


def gpu_windows_truth(t0: int, t1: int, held: Callable[[int], bool], lost: tuple[int, int]) -> list[list[Any]]:
    """Per closed 10 s window of GPU 0 (jobs, ``lost``) and GPU 1 (its process list "GPU is lost"
    throughout: unread in every window, never silent), sampled each second from t0: [gpu, window,
    allocated, unattributed, idle, unread, unsampled]."""
    out = []
    for start in range(0, t1 - t0, 10):
        if t0 + start + 10 > t1 - 1:  # closed only by a later sample: the last window is still open
            break
        seconds = range(t0 + start, t0 + start + 10)
        unread = sum(1 for t in seconds if lost[0] <= t < lost[1])
        alloc = sum(1 for t in seconds if held(t) and not lost[0] <= t < lost[1])
        out.append(["0", start, alloc, 0, 10 - alloc - unread, unread, 0])
        out.append(["1", start, 0, 0, 0, 10, 0])
    return sorted(out, key=lambda r: (r[1], r[0]))


def test_busy_seconds_through_the_real_pynvml_path_are_exact_at_a_handover(fake_lib: Path) -> None:
    """The stand-in driver runs F1's job [2, 13) at 100 % and F2's [13, 27) at 50 % on GPU 0 (its
    utilisation samples six a second, each of the period before it); the agent samples at 1 Hz into
    10 s windows. Per window and firm, allocated and busy seconds equal the truth exactly: no second
    moves to the next holder at the handover or into the next window."""
    t0 = 1_772_323_200  # a multiple of the window
    jobs = [(t0 + 2, t0 + 13, 101, 100), (t0 + 13, t0 + 27, 102, 50)]
    args = json.dumps([jobs, {"101": "F1", "102": "F2"}, t0, t0 + 40, [0, 0]])
    proc = subprocess.run([sys.executable, "-c", SCENARIO, args], env=child_env(fake_lib), capture_output=True,
                          text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    windows, gpu_windows = json.loads(proc.stdout)
    got = [(w["window_start"] // 1000 - t0, w["firm_id"], w["allocated_seconds"], w["busy_seconds"])
           for w in windows]  # fmt: skip
    # every second of both GPUs' windows: held or idle (GPU 0), unread (GPU 1, lost throughout)
    held = lambda t: any(s <= t < e for s, e, _, _ in jobs)  # noqa: E731
    assert sorted(gpu_windows, key=lambda r: (r[1], r[0])) == gpu_windows_truth(t0, t0 + 40, held, (0, 0))
    truth = []
    for start in range(0, 40, 10):
        for s, e, pid, util in jobs:
            overlap = min(e - t0, start + 10) - max(s - t0, start)
            if overlap > 0:
                truth.append((start, {101: "F1", 102: "F2"}[pid], overlap, overlap * util / 100))
    assert truth == [(0, "F1", 8, 8.0), (10, "F1", 3, 3.0), (10, "F2", 7, 3.5), (20, "F2", 7, 3.5)]
    assert got == truth


def test_on_a_gpu_two_firms_share_the_holder_is_credited_its_own_use(fake_lib: Path) -> None:
    """F1's process 101 (8 GiB) runs [0, 30), at 60 % until 15 and 20 % after; F2's (2 GiB) shares the
    GPU [12, 18) at 30 %, so the GPU is 90 % then 50 % busy. F1 holds every second (more memory); F2
    holds none, and its use is not F1's: through the driver's per-process figures, F1's busy seconds
    are exactly its own in every window - where before the shared window's were unknown - and every
    second is F1's allocation."""
    t0 = 1_772_323_200
    jobs = [(t0, t0 + 15, 101, 60, 8), (t0 + 15, t0 + 30, 101, 20, 8), (t0 + 12, t0 + 18, 102, 30, 2)]
    args = json.dumps([jobs, {"101": "F1", "102": "F2"}, t0, t0 + 31, [0, 0]])
    proc = subprocess.run([sys.executable, "-c", SCENARIO, args], env=child_env(fake_lib), capture_output=True,
                          text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    windows, gpu_windows = json.loads(proc.stdout)
    got = [(w["window_start"] // 1000 - t0, w["firm_id"], w["allocated_seconds"], w["busy_seconds"])
           for w in windows]  # fmt: skip
    # window 10: [10, 15) at 60 %, [15, 20) at 20 %; window 20 at 20 %
    assert got == [(0, "F1", 10, 6.0), (10, "F1", 10, 4.0), (20, "F1", 10, 2.0)]
    assert [r for r in gpu_windows if r[0] == "0"] == [["0", w, 10, 0, 0, 0, 0] for w in (0, 10, 20)]


def test_a_gpu_lost_while_sampling_bills_nothing_for_the_lost_seconds_and_says_so(fake_lib: Path) -> None:
    """F1's job runs [0, 30) at 80 %; GPU 0 is lost for [5, 15). The lost seconds are missed samples,
    billed to nobody; the interval before the loss was never read, so that window's busy is null;
    after the GPU is back (rediscovered) busy seconds are exact again."""
    t0 = 1_772_323_200
    args = json.dumps([[(t0, t0 + 30, 101, 80)], {"101": "F1"}, t0, t0 + 31, [t0 + 5, t0 + 15]])
    proc = subprocess.run([sys.executable, "-c", SCENARIO, args], env=child_env(fake_lib), capture_output=True,
                          text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    windows, gpu_windows = json.loads(proc.stdout)
    got = [(w["window_start"] // 1000 - t0, w["allocated_seconds"], w["samples_missed"], w["busy_seconds"])
           for w in windows]  # fmt: skip
    assert got == [(0, 5, 5, None), (10, 5, 5, 4.0), (20, 10, 0, 8.0)]
    # the lost seconds are unread in GPU 0's windows, as all of GPU 1's are
    truth = gpu_windows_truth(t0, t0 + 31, lambda t: t < t0 + 30, (t0 + 5, t0 + 15))
    assert [r for r in truth if r[0] == "0"] == [
        ["0", 0, 5, 0, 0, 5, 0],
        ["0", 10, 5, 0, 0, 5, 0],
        ["0", 20, 10, 0, 0, 0, 0],
    ]
    assert sorted(gpu_windows, key=lambda r: (r[1], r[0])) == truth


RESTARTS = (
    DRIVER
    + """
from pathlib import Path
from agent.nvml import Nvml
from agent.nvml_source import NvmlSource
from agent.runner import Agent
from agent.spool import Spool
from agent.windows import HostIdentity
from gpumeter.record import decode_batch
jobs, firms, t0, runs, lost, reset, spool_dir = json.loads(sys.argv[1])
add_jobs(t0, jobs)
spool = Spool(Path(spool_dir))
for a, b in runs:  # each run a new agent on the same spool: stopped (open windows saved), then started again
    lib.fakeNvmlSetTime(a * 1_000_000)
    lib.fakeNvmlSetLost(int(lost[0] <= a < lost[1]))
    src = NvmlSource(Nvml(), lambda pid, gpu: firms[str(pid)], interval_s=1, rediscover_s=0)
    meter = Agent(src, HostIdentity("P01", "h1"), spool, window_s=10, interval_s=1, checkpoint=spool)
    for t in range(a, b):
        lib.fakeNvmlSetTime(t * 1_000_000)
        lib.fakeNvmlSetLost(int(lost[0] <= t < lost[1]))
        if t == reset:
            lib.fakeNvmlResetEnergy()
        meter.sample(t)
    meter.stop()
parts = ("allocated_seconds", "unattributed_seconds", "idle_seconds", "unread_seconds", "unsampled_seconds")
windows, gpu = [], []
for e in spool.pending(10_000):
    batch = decode_batch(spool.read(e)[0])
    windows += [[w["window_start"] // 1000 - t0, w["allocated_seconds"], w["busy_seconds"], w["energy_joules"]]
                for w in batch["windows"] if w["gpu_uuid"].endswith("0")]
    gpu += [[g["gpu_uuid"][-1], g["window_start"] // 1000 - t0, *(g[k] for k in parts)] for g in batch["gpu_windows"]]
print(json.dumps([sorted(windows), sorted(gpu, key=lambda r: (r[1], r[0]))]))
"""
)


def run_restarts(fake_lib: Path, tmp_path: Path, *args: Any) -> tuple[list[list[Any]], list[list[Any]]]:
    proc = subprocess.run([sys.executable, "-c", RESTARTS, json.dumps([*args, str(tmp_path / "spool")])],
                          env=child_env(fake_lib), capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    windows, gpu = json.loads(proc.stdout)
    return windows, gpu


def test_a_gpu_lost_while_the_agent_is_down_loses_no_second(fake_lib: Path, tmp_path: Path) -> None:
    """F1's job runs [0, 40) at 80 % on GPU 0. The agent samples [0, 15), is stopped, and starts again
    at 25; GPU 0 is lost over [20, 35), while the agent is down and after. The window open at the
    stop closes with the seconds it did not see unsampled; the lost seconds are unread; nothing is
    dropped, and what was measured is exact. GPU 1 (its process list lost) is unread throughout."""
    t0 = 1_772_323_200
    windows, gpu = run_restarts(fake_lib, tmp_path, [(t0, t0 + 40, 101, 80)], {"101": "F1"}, t0,
                                [(t0, t0 + 15), (t0 + 25, t0 + 41)], [t0 + 20, t0 + 35], -1)  # fmt: skip
    assert [r for r in gpu if r[0] == "0"] == [
        ["0", 0, 10, 0, 0, 0, 0],
        ["0", 10, 5, 0, 0, 0, 5],  # 15..19: the agent down
        ["0", 20, 0, 0, 0, 5, 5],  # 20..24 down, 25..29 sampled and lost
        ["0", 30, 5, 0, 0, 5, 0],  # lost until 35, then F1's again
    ]
    assert [r for r in gpu if r[0] == "1"] == [
        ["1", 0, 0, 0, 0, 10, 0], ["1", 10, 0, 0, 0, 5, 5], ["1", 20, 0, 0, 0, 5, 5], ["1", 30, 0, 0, 0, 10, 0],
    ]  # fmt: skip
    # (window, allocated, busy, energy): the interval before the stop was never read, so window 10's
    # busy and energy are unknown; after the loss both are exact again (the counter grows 1 J a read)
    assert windows == [[0, 10, 8.0, 10.0], [10, 5, None, None], [30, 5, 4.0, 5.0]]


def test_an_energy_counter_reset_makes_exactly_its_window_unknown(fake_lib: Path, tmp_path: Path) -> None:
    """The driver's energy counter goes back to zero at 15 (a reload): the interval read then is the
    only one that cannot be measured, so window 10's energy is null and windows 0 and 20 exact."""
    t0 = 1_772_323_200
    windows, gpu = run_restarts(fake_lib, tmp_path, [(t0, t0 + 30, 101, 100)], {"101": "F1"}, t0,
                                [(t0, t0 + 31)], [0, 0], t0 + 15)  # fmt: skip
    assert windows == [[0, 10, 10.0, 10.0], [10, 10, 10.0, None], [20, 10, 10.0, 10.0]]
    assert [r for r in gpu if r[0] == "0"] == [["0", w, 10, 0, 0, 0, 0] for w in (0, 10, 20)]


REALTIME = """
import json, sys
from agent.nvml import Nvml
from agent.nvml_source import NvmlSource
from agent.runner import Agent, run_realtime
from agent.windows import HostIdentity
class Sink:
    gpu_windows = []
    def send(self, host, version, windows, gpu_windows):
        self.gpu_windows += gpu_windows
ticks = []
src = NvmlSource(Nvml(), lambda pid, gpu: "F1", interval_s=1)
meter = Agent(src, HostIdentity("P01", "h1"), Sink(), window_s=10, interval_s=1)
print("started", flush=True)
run_realtime(meter, 1, float(sys.argv[1]), after_sample=ticks.append)
parts = ("allocated_seconds", "unattributed_seconds", "idle_seconds", "unread_seconds", "unsampled_seconds")
gpu = [[g["gpu_uuid"][-1], g["window_start"] // 1000, *(g[k] for k in parts)] for g in Sink.gpu_windows]
print(json.dumps([ticks, gpu, meter.acc.samples_skipped]))
"""


def test_on_a_busy_host_frozen_for_seconds_every_second_is_still_accounted(fake_lib: Path) -> None:
    """The real-time loop at 1 Hz through the real pynvml path while two busy processes keep both
    cores at 100 % and the agent is frozen (SIGSTOP) for 3 s: every GPU window adds up to 10 s, GPU
    0's allocated seconds are exactly the ticks sampled in it, and every second not sampled - before
    the first tick, the freeze, after the stop - is unsampled, never billed and never lost."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        child = subprocess.Popen([sys.executable, "-c", REALTIME, "16"], env=child_env(fake_lib), cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert child.stdout is not None and child.stdout.readline().strip() == "started"
        time.sleep(6)
        child.send_signal(signal.SIGSTOP)
        time.sleep(3.5)
        child.send_signal(signal.SIGCONT)
        out, err = child.communicate(timeout=60)
    finally:
        for b in burners:
            b.kill()
            b.wait()
    assert child.returncode == 0, err
    ticks, gpu, skipped = json.loads(out)
    missing = set(range(ticks[0], ticks[-1] + 1)) - set(ticks)
    assert len(missing) >= 2 and skipped == 2 * len(missing)  # the freeze, counted for both GPUs
    windows = {w for _, w, *_ in gpu}
    assert windows == set(range(ticks[0] - ticks[0] % 10, ticks[-1] + 1, 10))  # the last closed at the stop
    for name, start, allocated, unattributed, idle, unread, unsampled in gpu:
        sampled = sum(1 for t in ticks if start <= t < start + 10)
        assert allocated + unattributed + idle + unread + unsampled == 10
        assert unsampled == 10 - sampled and (unattributed, idle) == (0, 0)
        assert (allocated, unread) == ((sampled, 0) if name == "0" else (0, sampled))  # GPU 1's list is lost
