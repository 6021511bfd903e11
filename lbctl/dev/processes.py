"""Start and stop the control plane's processes through pid files that name exactly what was
started, so `down` never signals an unrelated process that happened to reuse a pid."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PidRecord:
    pid: int
    start_ticks: int  # field 22 of /proc/<pid>/stat: tells a reused pid apart
    argv0: str


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: split after the last ')'
    return int(stat.rsplit(")", 1)[1].split()[19])


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def is_alive(record: PidRecord) -> bool:
    return _start_ticks(record.pid) == record.start_ticks and _state(record.pid) not in (None, "Z", "X")


def read(pid_file: Path) -> PidRecord | None:
    try:
        return PidRecord(**json.loads(pid_file.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def spawn(args: list[str], log_file: Path, pid_file: Path) -> subprocess.Popen[bytes]:
    """Start a process in its own session (it outlives `lbctl dev up`) and record it."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    ticks = _start_ticks(proc.pid) or 0
    pid_file.write_text(json.dumps({"pid": proc.pid, "start_ticks": ticks, "argv0": args[0]}))
    return proc


def stop(pid_file: Path, timeout_s: float = 10.0) -> str:
    """Stop the process a pid file names; returns what happened, for the user."""
    record = read(pid_file)
    name = pid_file.stem
    if record is None:
        pid_file.unlink(missing_ok=True)
        return f"{name}: no valid pid file"
    if not is_alive(record):
        pid_file.unlink(missing_ok=True)
        return f"{name}: stale pid file for pid {record.pid} removed (process already gone)"
    _signal(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and is_alive(record):
        reap(record.pid)
        time.sleep(0.05)
    if is_alive(record):
        _signal(record.pid, signal.SIGKILL)
        while is_alive(record):
            reap(record.pid)
            time.sleep(0.02)
        outcome = f"{name}: pid {record.pid} killed after {timeout_s:.0f}s"
    else:
        outcome = f"{name}: pid {record.pid} stopped"
    pid_file.unlink(missing_ok=True)
    return outcome


def _signal(pid: int, signum: int) -> None:
    # the process may exit between the liveness check and the signal: that is what we wanted
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def reap(pid: int) -> None:
    """Collect our own child so it does not linger as a zombie (no-op for other processes)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
