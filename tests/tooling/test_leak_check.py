"""The session-end leak check (tests/leakcheck.py), shown on throw-away test files run by a pytest of
their own: one that forgets a process and a lab namespace (the run fails, naming both, and they are
removed), one that stops what it starts (the run passes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FORGETFUL = '''
import os
import subprocess
from pathlib import Path

from lbctl.lab.netns import Lab


def test_forgets_what_it_started() -> None:
    proc = subprocess.Popen(["sleep", "600"])  # no finalizer: nothing stops it
    Path(os.environ["LEAK_PID_FILE"]).write_text(str(proc.pid))
    lab = Lab(prefix=os.environ["LEAK_LAB_PREFIX"])
    lab.add_namespace("forgotten")  # and the lab is never closed
'''

CAREFUL = '''
import os
import subprocess
from pathlib import Path

import pytest

from lbctl.lab.netns import Lab


def test_stops_what_it_started(request: pytest.FixtureRequest) -> None:
    proc = subprocess.Popen(["sleep", "600"])
    request.addfinalizer(lambda: (proc.kill(), proc.wait()))
    Path(os.environ["LEAK_PID_FILE"]).write_text(str(proc.pid))
    lab = Lab(prefix=os.environ["LEAK_LAB_PREFIX"])
    request.addfinalizer(lab.close)
    lab.add_namespace("kept-tidy")
'''


def alive(pid: int) -> bool:
    """Whether `pid` is a running `sleep 600` (not a zombie, not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return cmdline == b"sleep\x00600\x00" and state != "Z"


def run_inner(tmp_path: Path, source: str, request: pytest.FixtureRequest) -> tuple[subprocess.CompletedProcess[str],
                                                                                    int, str]:
    if os.geteuid() != 0:
        pytest.fail("the leak check test makes a network namespace: run as root", pytrace=False)
    test_file = tmp_path / "test_inner.py"
    test_file.write_text(source)
    pid_file = tmp_path / "pid"
    prefix = f"lbxk{os.getpid() % 4096:03x}"

    def clean_up() -> None:  # whatever the check did not remove, the outer test does
        if pid_file.exists() and alive(pid := int(pid_file.read_text())):
            os.kill(pid, signal.SIGKILL)
        for name in (f"{prefix}-forgotten", f"{prefix}-kept-tidy"):
            if Path(f"/run/netns/{name}").exists():
                subprocess.run(["ip", "netns", "del", name], check=False)
    request.addfinalizer(clean_up)

    env = {**os.environ, "PYTHONPATH": str(REPO), "LEAK_PID_FILE": str(pid_file), "LEAK_LAB_PREFIX": prefix}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.leakcheck", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), str(test_file)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    return result, int(pid_file.read_text()), prefix


def test_a_forgotten_process_and_namespace_fail_the_run_and_are_removed(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    result, pid, prefix = run_inner(tmp_path, FORGETFUL, request)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the test session left these behind" in result.stdout, result.stdout
    assert f"process {pid} sleep 600" in result.stdout
    assert f"netns {prefix}-forgotten" in result.stdout
    assert "1 passed, 1 error" in result.stdout
    deadline = time.monotonic() + 10  # killed by the check; its parent is gone, so init reaps it
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid), "the leak check did not stop the forgotten process"
    assert not Path(f"/run/netns/{prefix}-forgotten").exists()


def test_a_test_that_stops_what_it_started_passes_the_check(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    result, pid, prefix = run_inner(tmp_path, CAREFUL, request)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "left these behind" not in result.stdout
    assert "1 passed" in result.stdout and "error" not in result.stdout
    assert not alive(pid)
    assert not Path(f"/run/netns/{prefix}-kept-tidy").exists()
