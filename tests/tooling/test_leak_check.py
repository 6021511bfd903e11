"""The session-end leak check (tests/leakcheck.py), shown on throw-away test files run by a pytest of
their own: one that fails after leaving a process, a lab namespace and an nftables table of its
session behind (the run fails, the check names all three and removes them, and leaves alone a table
of another session that appeared meanwhile), one that stops what it starts (the run passes)."""

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
from tests.leakcheck import session_table_prefix


def test_fails_and_forgets_what_it_started() -> None:
    proc = subprocess.Popen(["sleep", "600"])  # no finalizer: nothing stops it
    Path(os.environ["LEAK_PID_FILE"]).write_text(str(proc.pid))
    lab = Lab(prefix=os.environ["LEAK_LAB_PREFIX"])
    lab.add_namespace("forgotten")  # and the lab is never closed
    table = f"{session_table_prefix()}-forgotten"
    Path(os.environ["LEAK_TABLE_FILE"]).write_text(table)
    subprocess.run(["nft", "add", "table", "ip", table], check=True)  # in the root namespace, never deleted
    # another session's table appears meanwhile (made here, but not named as this session's)
    subprocess.run(["nft", "add", "table", "ip", os.environ["LEAK_FOREIGN_TABLE"]], check=True)
    assert False, "this test fails on purpose, after leaving all that behind"
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


def tables() -> set[str]:
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    return {line.split()[2] for line in out.splitlines() if line.startswith("table ip ")}


def run_inner(tmp_path: Path, source: str, request: pytest.FixtureRequest) -> tuple[subprocess.CompletedProcess[str],
                                                                                    int, str]:
    if os.geteuid() != 0:
        pytest.fail("the leak check test makes a network namespace: run as root", pytrace=False)
    test_file = tmp_path / "test_inner.py"
    test_file.write_text(source)
    pid_file = tmp_path / "pid"
    table_file = tmp_path / "table"
    prefix = f"lbxk{os.getpid() % 4096:03x}"
    foreign = f"lbctl-othersession-{os.getpid()}"

    def clean_up() -> None:  # whatever the check did not remove, the outer test does
        if pid_file.exists() and alive(pid := int(pid_file.read_text())):
            os.kill(pid, signal.SIGKILL)
        for name in (f"{prefix}-forgotten", f"{prefix}-kept-tidy"):
            if Path(f"/run/netns/{name}").exists():
                subprocess.run(["ip", "netns", "del", name], check=False)
        for table in (foreign, *([table_file.read_text()] if table_file.exists() else [])):
            subprocess.run(["nft", "delete", "table", "ip", table], capture_output=True, check=False)
    request.addfinalizer(clean_up)

    env = {**os.environ, "PYTHONPATH": str(REPO), "LEAK_PID_FILE": str(pid_file), "LEAK_LAB_PREFIX": prefix,
           "LEAK_TABLE_FILE": str(table_file), "LEAK_FOREIGN_TABLE": foreign}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.leakcheck", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), str(test_file)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    return result, int(pid_file.read_text()), prefix


def test_a_failing_test_that_leaves_a_process_namespace_and_table_is_caught_and_cleaned_up(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    result, pid, prefix = run_inner(tmp_path, FORGETFUL, request)
    table = (tmp_path / "table").read_text()
    foreign = f"lbctl-othersession-{os.getpid()}"
    assert result.returncode == 1, result.stdout + result.stderr
    assert "this test fails on purpose" in result.stdout
    assert "the test session left these behind" in result.stdout, result.stdout
    assert f"process {pid} sleep 600" in result.stdout
    assert f"netns {prefix}-forgotten" in result.stdout
    assert f"nft ip {table}" in result.stdout
    assert "1 failed, 1 error" in result.stdout
    # another session's table is named as a note, not as a leak, and is still there
    assert f"nft ip {foreign}" not in result.stdout
    assert f"ip {foreign} appeared in the root namespace" in result.stdout, result.stdout
    assert foreign in tables()
    assert table not in tables()
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
