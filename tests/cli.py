"""The installed `vdistill` console script, run as a user types it: its own process, a folder of the test's
choosing, no RAY_ADDRESS (so it starts and stops its own local Ray)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest


def vdistill(args: list[str], cwd: str | Path, timeout: int = 900, *, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess:
    """Run `vdistill ARGS` in `cwd` in its own process group, so that on a timeout the local Ray it started goes
    too; `env` replaces the test process's environment (default: it, without RAY_ADDRESS)."""
    exe = shutil.which("vdistill")
    assert exe, "the vdistill console script is not installed: pip install -e '.[test]'"
    env = env if env is not None else {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([exe, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"vdistill {' '.join(args[:2])} ran past {timeout}s:\n{out[-3000:]}\n{err[-3000:]}")
    finally:
        try:  # whatever of its Ray is still there (it stops its own on a normal exit)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
