"""Faults on the embedded control plane, for tests and benchmarks: kill a component and start it
again with its own command line (over the same etcd data), or freeze and thaw it.

The restarted process is recorded in the same pid file, so `lbctl dev down` still stops exactly
what runs.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from lbctl.dev import processes
from lbctl.dev.layout import Layout


class FaultError(RuntimeError):
    pass


def _record(directory: Path, component: str) -> processes.PidRecord:
    record = processes.read(Layout(directory.resolve()).pid_file(component))
    if record is None or not processes.is_alive(record):
        raise FaultError(f"{component} is not running in {directory}")
    return record


def command_line(directory: Path, component: str) -> list[str]:
    """The running component's argv, as the kernel has it."""
    record = _record(directory, component)
    raw = Path(f"/proc/{record.pid}/cmdline").read_bytes()
    return [part.decode() for part in raw.split(b"\0") if part]


def kill(directory: Path, component: str) -> list[str]:
    """SIGKILL the component (no goodbye); returns its argv for `start_again`."""
    argv = command_line(directory, component)
    record = _record(directory, component)
    os.kill(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while processes.is_alive(record):
        processes.reap(record.pid)
        if time.monotonic() > deadline:
            raise FaultError(f"{component} (pid {record.pid}) survived SIGKILL")
        time.sleep(0.02)
    return argv


def start_again(directory: Path, component: str, argv: list[str]) -> None:
    lay = Layout(directory.resolve())
    processes.spawn(argv, lay.log(component), lay.pid_file(component))


def freeze(directory: Path, component: str) -> None:
    os.kill(_record(directory, component).pid, signal.SIGSTOP)


def thaw(directory: Path, component: str) -> None:
    """SIGCONT; safe to call when the component is not frozen (teardown)."""
    record = processes.read(Layout(directory.resolve()).pid_file(component))
    if record is not None and processes.is_alive(record):
        os.kill(record.pid, signal.SIGCONT)
