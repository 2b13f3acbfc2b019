"""The fleet file: every rule of a whole file, each refusal naming its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpumeter.fleet import FLEET_COLUMNS, OPEN_END, fleet_digest, read_fleet
from gpumeter.inputfiles import InputFileError

HEADER = ",".join(FLEET_COLUMNS)
H1 = "P01,P01-H01,GPU-a,H100-80G,60,2026-01-01T00:00:00Z,,"


def write(tmp_path: Path, *rows: str) -> Path:
    path = tmp_path / "fleet.csv"
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return path


def problems(tmp_path: Path, *rows: str) -> list[str]:
    with pytest.raises(InputFileError) as info:
        read_fleet(write(tmp_path, *rows))
    return [f"{line}: {reason}" for line, reason in info.value.problems]


def test_a_good_file_reads_whole(tmp_path: Path) -> None:
    devices = read_fleet(write(
        tmp_path,
        H1,
        "P01,P01-H01,GPU-b,H100-80G,60,2026-01-01T00:00:00Z,2026-02-01T00:00:00+00:00,",
        "P01,P01-H02,GPU-b,H20,300,2026-02-01T08:00:00+08:00,,",  # moved, re-classed, same instant
        "P01,P01-H02,MIG-1,H100-1g.10gb,300,2026-02-01T00:00:00Z,,GPU-c",
    ))  # fmt: skip
    assert [(d.line, d.gpu_uuid, d.host_id, d.gpu_class) for d in devices] == [
        (2, "GPU-a", "P01-H01", "H100-80G"), (3, "GPU-b", "P01-H01", "H100-80G"),
        (4, "GPU-b", "P01-H02", "H20"), (5, "MIG-1", "P01-H02", "H100-1g.10gb"),
    ]  # fmt: skip
    assert devices[0].valid_to == OPEN_END and devices[3].parent_uuid == "GPU-c"
    assert devices[1].valid_to == devices[2].valid_from


def test_every_problem_of_a_file_is_reported_at_once(tmp_path: Path) -> None:
    assert problems(
        tmp_path,
        H1,
        "P01,P01-H01,GPU-a,H100-80G,60,2026-06-01T00:00:00Z,,",  # overlaps line 2
        "P01,P01-H01,GPU-x,H100-80G,7,2026-01-01T00:00:00Z,,",  # 7 does not divide 3600
        "P01,P01-H01,GPU-y,H100-80G,60,2026-01-01T00:30:00Z,,",  # not on the hour
        "P02,P01-H01,GPU-z,H100-80G,60,2026-01-01T00:00:00Z,,",  # host of another provider
        "P01,P01-H01,GPU-w,H100-80G,300,2026-01-01T00:00:00Z,,",  # another window length
        "P01,P01-H01,GPU-v,H100-80G,60,2026-01-02T00:00:00Z,2026-01-01T00:00:00Z,",  # ends before it starts
        "P01,P01-H01,GPU v,H100-80G,60,2026-01-01T00:00:00Z,,",  # a space in the id
        "P01,P01-H01,GPU-u,H100-80G,60,2026-01-01T00:00:00,,",  # no offset
    ) == [
        "3: GPU GPU-a is also registered for this time on line 2",
        "4: window_seconds 7 must divide 3600 (e.g. 60, 300, 3600) or 86400 (e.g. 86400)",
        "5: valid_from '2026-01-01T00:30:00Z' must fall on a whole hour",
        "6: host P01-H01 belongs to P01 on line 2",
        "7: host P01-H01 has window_seconds 60 on line 2",
        "8: valid_to 2026-01-01T00:00:00Z must be after valid_from 2026-01-02T00:00:00Z",
        "9: gpu_uuid 'GPU v' must be letters, digits and . _ : - (at most 128)",
        "10: valid_from '2026-01-01T00:00:00' has no UTC offset",
    ]


def test_a_gpu_in_mig_mode_is_registered_through_its_instances(tmp_path: Path) -> None:
    assert problems(tmp_path, H1, "P01,P01-H01,MIG-1,H100-1g.10gb,60,2026-03-01T00:00:00Z,,GPU-a") == [
        "2: GPU GPU-a is in MIG mode (instance on line 3): register its instances only"
    ]


def test_an_empty_file_is_refused(tmp_path: Path) -> None:
    assert problems(tmp_path) == ["1: no devices: a fleet file lists at least one GPU"]


def test_the_digest_is_the_content_not_the_order(tmp_path: Path) -> None:
    row2 = "P01,P01-H01,GPU-b,H100-80G,60,2026-01-01T00:00:00Z,,"
    a = read_fleet(write(tmp_path, H1, row2))
    b = read_fleet(write(tmp_path, row2, "", H1))
    c = read_fleet(write(tmp_path, H1, row2.replace("H100-80G", "H20")))
    assert fleet_digest(a) == fleet_digest(b) != fleet_digest(c)
