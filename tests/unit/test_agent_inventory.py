"""`gpumeter agent inventory`: this host's fleet-registry rows from NVML (the fake at the pynvml boundary)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_agent_nvml import GPU_IS_LOST, FakeGpu, FakePynvml

from agent.config import AgentConfig, load_agent_config
from agent.inventory import InventoryError, hour_start, inventory_rows, parse_hour, read_devices, render, write_output
from agent.nvml import LIBRARY_NOT_FOUND
from gpumeter.cli import cli, main
from gpumeter.errors import ConfigError
from gpumeter.fleet import OPEN_END, read_fleet

HEADER = "provider_id,host_id,gpu_uuid,gpu_class,window_seconds,valid_from,valid_to,parent_uuid"
T0 = datetime(2026, 12, 2, 3, tzinfo=UTC)
CFG = AgentConfig(provider_id="P07", host_id="h1", window_s=300)


def l40s(uuid: str) -> FakeGpu:
    return FakeGpu(uuid, name="NVIDIA L40S", total=46068 * 2**20)


def mig_gpu() -> FakeGpu:
    return FakeGpu(
        "GPU-p",
        mig=[
            FakeGpu("MIG-2", name="NVIDIA H100 80GB HBM3 MIG 1g.10gb", gi=2),
            FakeGpu("MIG-1", name="NVIDIA H100 80GB HBM3 MIG 3g.40gb", gi=1),
        ],
    )


def inventory_text(gpus: list[FakeGpu], cfg: AgentConfig = CFG) -> str:
    return render(inventory_rows(read_devices(FakePynvml(gpus)), cfg, T0))


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakePynvml:
    """The fake stands in for the pynvml module itself, so the command runs as on a GPU host."""
    monkeypatch.setenv("GPUMETER_HOME", str(tmp_path))
    lib = FakePynvml([FakeGpu("GPU-b"), l40s("GPU-a")])
    monkeypatch.setitem(sys.modules, "pynvml", lib)
    return lib


def test_plain_gpus_one_row_each_sorted_by_uuid() -> None:
    assert inventory_text([FakeGpu("GPU-b"), l40s("GPU-a")]).splitlines() == [
        HEADER,
        "P07,h1,GPU-a,L40S-48G,300,2026-12-02T03:00:00Z,,",
        "P07,h1,GPU-b,H100-80G,300,2026-12-02T03:00:00Z,,",
    ]


def test_a_mig_gpu_is_listed_as_its_instances_with_parent_uuid() -> None:
    assert inventory_text([l40s("GPU-z"), mig_gpu()]).splitlines() == [
        HEADER,
        "P07,h1,GPU-z,L40S-48G,300,2026-12-02T03:00:00Z,,",
        "P07,h1,MIG-1,H100-80G-MIG-3g.40gb,300,2026-12-02T03:00:00Z,,GPU-p",
        "P07,h1,MIG-2,H100-80G-MIG-1g.10gb,300,2026-12-02T03:00:00Z,,GPU-p",
    ]


def test_the_output_loads_as_a_fleet_file(tmp_path: Path) -> None:
    path = tmp_path / "fleet.csv"
    write_output(path, inventory_text([FakeGpu("GPU-b"), mig_gpu()]))
    assert [p.name for p in tmp_path.iterdir()] == ["fleet.csv"]  # no temp file left behind
    devices = read_fleet(path)
    assert [(d.gpu_uuid, d.parent_uuid, d.window_seconds, d.valid_from, d.valid_to) for d in devices] == [
        ("GPU-b", "", 300, T0, OPEN_END),
        ("MIG-1", "GPU-p", 300, T0, OPEN_END),
        ("MIG-2", "GPU-p", 300, T0, OPEN_END),
    ]
    assert {(d.provider_id, d.host_id) for d in devices} == {("P07", "h1")}


def test_classes_are_the_agents_own_config_overrides_included() -> None:
    cfg = AgentConfig(provider_id="P07", host_id="h1", gpu_classes={"GPU-b": "H100-SXM", "NVIDIA L40S": "L40S-X"})
    rows = inventory_rows(read_devices(FakePynvml([FakeGpu("GPU-b"), l40s("GPU-a")])), cfg, T0)
    assert [(r["gpu_uuid"], r["gpu_class"]) for r in rows] == [("GPU-a", "L40S-X"), ("GPU-b", "H100-SXM")]


def test_a_class_the_registry_would_refuse_is_refused_here() -> None:
    cfg = AgentConfig(provider_id="P07", host_id="h1", gpu_classes={"GPU-b": "H100 SXM"})
    with pytest.raises(InventoryError) as err:
        inventory_rows(read_devices(FakePynvml([FakeGpu("GPU-b")])), cfg, T0)
    assert str(err.value) == (
        "gpu_class 'H100 SXM' of GPU GPU-b cannot stand in the fleet registry (letters, digits and . _ : -, "
        "at most 128): set its class in [gpu_classes] of the agent config"
    )


@pytest.mark.parametrize(
    ("gpus", "message"),
    [
        ([], "NVML is up but lists no GPU on this host: nothing to register"),
        ([FakeGpu("GPU-p", mig=[])], "GPU(s) GPU-p in MIG mode with no MIG instance: nothing to register"),
    ],
    ids=["no-gpu", "mig-without-instances"],
)
def test_nothing_to_register_is_an_error(gpus: list[FakeGpu], message: str) -> None:
    with pytest.raises(InventoryError) as err:
        read_devices(FakePynvml(gpus))
    assert str(err.value) == message


def test_a_gpu_nvml_counts_but_cannot_read_refuses_a_partial_inventory() -> None:
    lib = FakePynvml([FakeGpu("GPU-a"), FakeGpu("GPU-b")])
    lib.fail[("nvmlDeviceGetUUID", "GPU-b")] = GPU_IS_LOST
    with pytest.raises(InventoryError) as err:
        read_devices(lib)
    assert str(err.value).startswith("NVML counts 2 GPU(s) but 1 could be read (GPU-a): ")
    assert not lib.initialised  # the session was shut


def test_hours() -> None:
    assert hour_start(datetime(2026, 12, 2, 3, 59, 59, 999999, tzinfo=UTC)) == T0
    assert parse_hour("2026-12-02T03:00:00Z") == T0
    assert parse_hour("2026-12-02T03:00:00+00:00") == T0
    assert parse_hour("2026-12-02T08:30:00+05:30") == T0  # a whole UTC hour, written in another zone
    with pytest.raises(ValueError, match="not on a whole UTC hour"):
        parse_hour("2026-12-02T03:00:00+00:30")
    with pytest.raises(ValueError, match="is not an ISO-8601 time with a UTC offset"):
        parse_hour("2026-12-02T03:00:00")
    with pytest.raises(ValueError, match="not on a whole UTC hour"):
        inventory_rows([], CFG, datetime(2026, 12, 2, 3, 1, tzinfo=UTC))


@pytest.mark.parametrize("window", [7, 7200])
def test_a_window_that_does_not_divide_an_hour_is_refused_by_the_config(tmp_path: Path, window: int) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f"[agent]\nwindow_s = {window}\n")
    with pytest.raises(ConfigError) as err:
        load_agent_config(path)
    assert str(err.value) == (
        f"{path}: agent setting window_s must divide 3600 so windows never straddle an hour "
        f"(e.g. 60, 300, 600, 3600), got {window}"
    )
    with pytest.raises(ConfigError, match=f"window_s \\(--window\\) must divide 3600 .*, got {window}$"):
        load_agent_config(None, window_s=window)
    path.write_text("window_s = 3600\n")
    assert load_agent_config(path).window_s == 3600


# --- the command --------------------------------------------------------------------------------


def test_cli_prints_the_rows_for_the_current_hour(fake_nvml: FakePynvml, tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text('provider_id = "P07"\nhost_id = "h1"\nwindow_s = 600\n')
    before = hour_start(datetime.now(UTC))
    result = CliRunner().invoke(cli, ["agent", "inventory", "--agent-config", str(tmp_path / "agent.toml")])
    after = hour_start(datetime.now(UTC))
    assert result.exit_code == 0, result.output
    header, *rows = result.output.splitlines()
    assert header == HEADER
    starts = {f"{t:%Y-%m-%dT%H:%M:%SZ}" for t in (before, after)}
    assert [r.split(",")[2] for r in rows] == ["GPU-a", "GPU-b"]
    assert {r.split(",")[5] for r in rows} <= starts
    assert all(r.startswith("P07,h1,") and ",600," in r for r in rows)


def test_cli_output_file_and_valid_from(fake_nvml: FakePynvml, tmp_path: Path) -> None:
    out = tmp_path / "fleet.csv"
    out.write_text("old\n")
    argv = ["agent", "inventory", "--valid-from", "2026-12-02T03:00:00Z", "--output", str(out)]
    result = CliRunner().invoke(cli, argv)
    assert (result.exit_code, result.output) == (0, "")
    assert [d.valid_from for d in read_fleet(out)] == [T0, T0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleet.csv"]


def test_cli_refuses_valid_from_not_on_an_hour(fake_nvml: FakePynvml, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["agent", "inventory", "--valid-from", "2026-12-02T03:30:00Z"], capsys)
    assert (code, out) == (2, "")
    assert err.splitlines()[-1] == (
        "Error: Invalid value for '--valid-from': '2026-12-02T03:30:00Z' is not on a whole UTC hour: "
        "the registry changes only on the hour (e.g. 2026-12-02T03:00:00Z)"
    )


def test_cli_refuses_a_window_of_7(fake_nvml: FakePynvml, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text("window_s = 7\n")
    code, out, err = run(["agent", "inventory", "--agent-config", str(tmp_path / "agent.toml")], capsys)
    assert (code, out) == (1, "")
    assert err == (
        f"Error: {tmp_path / 'agent.toml'}: agent setting window_s must divide 3600 so windows never "
        "straddle an hour (e.g. 60, 300, 600, 3600), got 7\n"
    )


def test_cli_without_nvml_says_so_in_one_line(fake_nvml: FakePynvml, capsys: pytest.CaptureFixture[str]) -> None:
    fake_nvml.fail[("nvmlInit", "*")] = LIBRARY_NOT_FOUND
    code, out, err = run(["agent", "inventory"], capsys)
    assert (code, out) == (1, "")
    assert err == (
        "Error: NVML is not available on this host (NVML Shared Library Not Found): "
        "the inventory lists the GPUs the NVIDIA driver sees\n"
    )


def test_cli_without_a_gpu_says_so_in_one_line(fake_nvml: FakePynvml, capsys: pytest.CaptureFixture[str]) -> None:
    fake_nvml.gpus.clear()
    code, out, err = run(["agent", "inventory"], capsys)
    assert (code, out, err) == (1, "", "Error: NVML is up but lists no GPU on this host: nothing to register\n")


def test_cli_help_shows_an_example() -> None:
    text = CliRunner().invoke(cli, ["agent", "inventory", "--help"]).output
    assert "Example:\n    gpumeter agent inventory --agent-config" in text
    assert "--valid-from TIME" in text and "--output FILE" in text
