"""Running the console scripts in tests: in-process (click's CliRunner) or as real subprocesses.

The scripts (``discover-directions``, ``apply-directions``, ``plot-sweep``, ``flowgrad``) are found
next to the running interpreter, then on PATH; without an installed script the command is run with
``python -c`` importing its click command, so the tests work with and without ``pip install -e .``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner, Result

ROOT = Path(__file__).resolve().parents[1]

COMMANDS = {
    "discover-directions": ("cli.discover", "discover_directions"),
    "apply-directions": ("cli.apply", "apply_directions"),
    "plot-sweep": ("cli.sweep", "plot_sweep"),
    "flowgrad": ("cli.main", "flowgrad"),
}

TINY_DISCOVERY = ["--n-images", "4", "--batch-size", "2", "--steps", "4", "--iterations", "1",
                  "--replicas", "1", "--aggregator", "mean", "--device", "cpu"]
"""Discovery settings small enough for a 2-core CPU (about 2 s per job in-process); the mean aggregator whatever
the attribute's recipe, so the per-image machinery (records, offsets, resume) is what these jobs exercise."""


def command(name: str):
    """The click command object behind console script ``name``."""
    import importlib

    module, attr = COMMANDS[name]
    return getattr(importlib.import_module(module), attr)


def invoke(name: str, *args: object) -> Result:
    """Run console script ``name`` in this process; stdout and stderr are captured separately."""
    return CliRunner().invoke(command(name), [str(a) for a in args], catch_exceptions=True)


def script_argv(name: str) -> list[str]:
    """argv prefix that runs console script ``name`` in a fresh process."""
    sibling = Path(sys.executable).parent / name
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return [str(sibling)]
    found = shutil.which(name)
    if found:
        return [found]
    module, attr = COMMANDS[name]  # not installed: run it as the console script would (cli.common.run_program)
    return [sys.executable, "-c", f"import sys; sys.argv[0] = {name!r}; from cli.common import run_program; "
                                  f"from {module} import {attr} as c; run_program(c)"]


def subprocess_env() -> dict[str, str]:
    """Environment for child processes: one thread (2-core CI machines), offline, this checkout first."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_script(name: str, *args: object, cwd: Path | None = None, timeout: float = 120.0,
               ) -> subprocess.CompletedProcess:
    """Run console script ``name`` in a subprocess and wait; output is captured as text."""
    return subprocess.run([*script_argv(name), *map(str, args)], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def start_script(name: str, *args: object, cwd: Path | None = None) -> subprocess.Popen:
    """Start console script ``name`` in a subprocess (stdout/stderr to pipes)."""
    return subprocess.Popen([*script_argv(name), *map(str, args)], cwd=cwd, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_one_line_error(exit_code: int, stderr: str, *fragments: str) -> str:
    """A user error: non-zero exit, exactly one non-empty stderr line ``error: ...``, no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert exit_code != 0, f"expected a failure, got exit 0 (stderr: {stderr!r})"
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not a one-line error: {stderr!r}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def assert_cli_error(result: Result, *fragments: str) -> str:
    """:func:`assert_one_line_error` for a CliRunner result (which must have exited, not crashed)."""
    assert isinstance(result.exception, SystemExit), \
        f"command crashed with {result.exception!r} instead of a one-line error"
    return assert_one_line_error(result.exit_code, result.stderr, *fragments)


def digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
