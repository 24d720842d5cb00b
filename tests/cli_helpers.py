"""Checks shared by the CLI tests of every subcommand."""

from __future__ import annotations

from leapllm.cli.main import main


def assert_one_line_error(capsys, argv, pattern):
    """`leapllm argv` exits 2 with exactly one `leapllm: error:` line containing pattern, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # A loading progress bar (carriage-return redrawn) may come first; the error is one line.
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1].startswith("leapllm: error:") and sum("error" in line for line in lines) == 1, err
    assert pattern in lines[-1], err
