"""What the CLI tests share: run a ``ropekit`` command in-process and read its one-line error."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from ropekit.cli import build_app

runner = CliRunner()
PROGRESS = re.compile(r"\d+%\|")  # a tqdm progress bar ("Loading weights: 100%|####| 21/21")


def invoke(*args):
    """``ropekit ARGS`` (any path-like arguments as strings); the click ``Result``."""
    return runner.invoke(build_app(), [str(a) for a in args])


def one_error_line(result, prefix: str = "", *fragments: str, progress: bool = False) -> str:
    """Exit 2, no traceback, exactly one non-empty stderr line ``error: <prefix>...`` holding every fragment
    (``progress``: besides the progress bars of a load that did happen)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines()
             if line.strip() and not (progress and PROGRESS.search(line))]
    assert len(lines) == 1 and lines[0].startswith(f"error: {prefix}"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]
