"""Progress in a log file: rich draws nothing there until the end, so plain lines appear instead."""

import time

import pytest

from userllm import progress


def test_progress_prints_lines_when_stderr_is_not_a_terminal(capsys):
    assert not progress.console.is_terminal  # pytest captures stderr
    with progress.progress_bar("examples", log_every_s=0.05) as p:
        task = p.add_task("scoring", total=4)
        for _ in range(4):
            time.sleep(0.06)
            p.advance(task)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("scoring: ")]
    assert lines and all("examples/s" in line and "/4" in line for line in lines)


def test_throughput_of_work_slower_than_richs_window_is_the_average():
    """Steps a minute apart leave rich's 30-second speed window without two samples (it reported 0.0/s
    in logs): the rate falls back to the average since the start."""
    with progress.progress_bar("examples", transient=True) as p:
        task_id = p.add_task("training", total=10)
        time.sleep(0.05)
        p.advance(task_id, 2)
        task = p.tasks[0]
        assert task.speed is None  # one sample
        assert 0 < progress.rate(task) <= 2 / 0.05
        assert progress.remaining(task) == pytest.approx((10 - 2) / progress.rate(task), rel=0.2)


def test_rates_below_one_a_second_keep_two_significant_digits():
    """A TP training example takes ~20 s: the log said "0.0 examples/s" for hours."""
    assert progress.format_rate(0.05, "examples") == "0.05 examples/s"
    assert progress.format_rate(0.0123, "examples") == "0.012 examples/s"
    assert progress.format_rate(2.345, "rows") == "2.3 rows/s"
    assert progress.format_rate(512.0, "rows") == "512 rows/s"
    assert progress.format_rate(12_345.0, "tokens") == "12.3k tokens/s"
    assert progress.format_rate(None, "rows") == "- rows/s"
