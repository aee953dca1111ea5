"""Progress in a log file: rich draws nothing there until the end, so plain lines appear instead."""

import time

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
