"""The real pynvml ctypes path, against a stand-in libnvidia-ml.so.1 built here with gcc.

pynvml loads ``CDLL("libnvidia-ml.so.1")`` with no search path of its own and the
loader reads LD_LIBRARY_PATH at process start, so each test runs a child process.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

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


SCENARIO = """
import ctypes, json, sys
from agent.nvml import Nvml
from agent.nvml_source import NvmlSource
from agent.runner import Agent
from agent.windows import HostIdentity
jobs, firms, t0, t1, lost = json.loads(sys.argv[1])
lib = ctypes.CDLL("libnvidia-ml.so.1")  # the library pynvml loads: the same handle
lib.fakeNvmlSetTime.argtypes = [ctypes.c_ulonglong]
lib.fakeNvmlSetLost.argtypes = [ctypes.c_int]
lib.fakeNvmlAddJob.argtypes = [ctypes.c_ulonglong, ctypes.c_ulonglong, ctypes.c_uint, ctypes.c_uint]
lib.fakeNvmlSetTime(t0 * 1_000_000)
for start, end, pid, util in jobs:
    lib.fakeNvmlAddJob(start * 1_000_000, end * 1_000_000, pid, util)
class Sink:
    windows = []
    def send(self, host, version, windows):
        self.windows += windows
src = NvmlSource(Nvml(), lambda pid, gpu: firms[str(pid)], interval_s=1, rediscover_s=0)
meter = Agent(src, HostIdentity("P01", "h1"), Sink(), window_s=10, interval_s=1)
for t in range(t0, t1):
    lib.fakeNvmlSetTime(t * 1_000_000)
    lib.fakeNvmlSetLost(int(lost[0] <= t < lost[1]))
    meter.sample(t)
print(json.dumps([w for w in Sink.windows if w["gpu_uuid"].endswith("0")]))
"""


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
    got = [(w["window_start"] // 1000 - t0, w["firm_id"], w["allocated_seconds"], w["busy_seconds"])
           for w in json.loads(proc.stdout)]  # fmt: skip
    truth = []
    for start in range(0, 40, 10):
        for s, e, pid, util in jobs:
            overlap = min(e - t0, start + 10) - max(s - t0, start)
            if overlap > 0:
                truth.append((start, {101: "F1", 102: "F2"}[pid], overlap, overlap * util / 100))
    assert truth == [(0, "F1", 8, 8.0), (10, "F1", 3, 3.0), (10, "F2", 7, 3.5), (20, "F2", 7, 3.5)]
    assert got == truth


def test_a_gpu_lost_while_sampling_bills_nothing_for_the_lost_seconds_and_says_so(fake_lib: Path) -> None:
    """F1's job runs [0, 30) at 80 %; GPU 0 is lost for [5, 15). The lost seconds are missed samples,
    billed to nobody; the interval before the loss was never read, so that window's busy is null;
    after the GPU is back (rediscovered) busy seconds are exact again."""
    t0 = 1_772_323_200
    args = json.dumps([[(t0, t0 + 30, 101, 80)], {"101": "F1"}, t0, t0 + 31, [t0 + 5, t0 + 15]])
    proc = subprocess.run([sys.executable, "-c", SCENARIO, args], env=child_env(fake_lib), capture_output=True,
                          text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = [(w["window_start"] // 1000 - t0, w["allocated_seconds"], w["samples_missed"], w["busy_seconds"])
           for w in json.loads(proc.stdout)]  # fmt: skip
    assert got == [(0, 5, 5, None), (10, 5, 5, 4.0), (20, 10, 0, 8.0)]
