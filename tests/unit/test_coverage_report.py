"""The coverage report's text: what adds up, and each kind of problem named per GPU."""

from __future__ import annotations

from pipeline.coverage import coverage_table


def row(gpu: str, *, mismatched: int = 0, missing: int = 0) -> tuple[object, ...]:
    # provider, host, gpu, class, windows, capacity, allocated, unattributed, idle, unread, unsampled, ...
    return ("P01", "h1", gpu, "H100-80G", 60, 3600, 1800, 60, 1200, 300, 240, mismatched, missing)


def test_totals_add_up_and_a_clean_period_says_so() -> None:
    text, problems = coverage_table([row("GPU-a"), row("GPU-b")])
    assert problems == 0
    total = next(line for line in text.splitlines() if line.startswith("TOTAL")).split()
    assert total == ["TOTAL", "120", "2.000000", "1.000000", "0.033333", "0.666667", "0.166667", "0.133333"]
    assert text.endswith("every GPU window adds up, none missing, every usage window covered")


def test_each_problem_is_named_with_its_host_and_gpu() -> None:
    rows = [row("GPU-a", mismatched=2), row("GPU-b", missing=120), row("GPU-c", missing=-60)]
    text, problems = coverage_table(rows, [("h1", "GPU-d", 3, 180)])
    assert problems == 4
    assert [line for line in text.splitlines() if line.startswith("PROBLEM")] == [
        "PROBLEM h1 GPU-a: 2 GPU window(s) whose usage windows do not add up to them",
        "PROBLEM h1 GPU-b: 0.033333 h with no GPU window between its first and last",
        "PROBLEM h1 GPU-c: GPU windows overlap by 0.016667 h (windows of two lengths)",
        "PROBLEM h1 GPU-d: 3 usage window(s) (0.050000 h) with no GPU window",
    ]


def test_no_gpu_windows_is_said_plainly() -> None:
    assert coverage_table([]) == ("no GPU windows in this period (agents before 0.3.0 send none)", 0)
