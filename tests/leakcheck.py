"""The session-end leak check: a run fails if anything the suite started is still there after every
fixture has been torn down — a process, a network namespace or root link of one of its labs, an
nftables table of its own in the root namespace. What it finds is listed, then removed, so one bad
run does not leave the machine to the next.

How the suite knows what is its own, with other test sessions running on the same machine:
- processes: `pytest_configure` puts LBCTL_TEST_SESSION=<a new uuid> into os.environ, which every
  process the suite starts inherits (its children too, through `ip netns exec`); at the end
  /proc/*/environ is scanned for it;
- namespaces and links: every `lbctl.lab.netns.Lab` appends its prefix to the ledger file named by
  LBCTL_LAB_LEDGER (also the labs of processes the suite starts, such as `lbctl demo`);
- nftables tables: a table the suite makes in the root namespace is named with the session's prefix,
  `session_table_prefix()` (LBCTL_TEST_NFT_PREFIX=lbctl-test-<12 hex of the uuid>); only those are
  this session's. Other lbctl* tables that appeared meanwhile may be another session's (or a process
  of another suite): they are named in the summary as a note and left alone, never deleted.

Registered by tests/conftest.py; `python3 -m pytest -p tests.leakcheck …` adds it to any run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from _pytest.reports import TestReport

from lbctl.lab.netns import LEDGER_ENV, leftovers

SESSION_ENV = "LBCTL_TEST_SESSION"
TABLE_PREFIX_ENV = "LBCTL_TEST_NFT_PREFIX"
# processes the last teardown signalled may need a moment to exit
_EXIT_GRACE_S = 5.0


@dataclass
class _Session:
    marker: str
    ledger: Path
    tables_before: set[str]
    table_prefix: str


_KEY = pytest.StashKey[_Session]()


def session_processes(marker: str, exclude: frozenset[int] = frozenset()) -> dict[int, str]:
    """Live processes (not zombies) whose environment has LBCTL_TEST_SESSION=`marker`: pid → command line."""
    needle = f"{SESSION_ENV}={marker}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if state != "Z":
            found[int(entry.name)] = cmdline
    return found


def nft_tables() -> set[str]:
    """The root namespace's nftables tables named lbctl* ("ip lbctl")."""
    try:
        out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False).stdout
    except OSError:  # no nft: nobody can have made a table
        return set()
    tables = set()
    for line in out.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "table" and words[2].startswith("lbctl"):
            tables.add(f"{words[1]} {words[2]}")
    return tables


def session_table_prefix() -> str:
    """How a table this session makes in the root namespace must begin (`nft add table ip <prefix>-x`)."""
    return os.environ[TABLE_PREFIX_ENV]


def own_tables(tables: set[str], prefix: str) -> set[str]:
    """Of "family name" entries, those named with the session's table prefix."""
    return {t for t in tables if t.partition(" ")[2].startswith(prefix)}


def pytest_configure(config: pytest.Config) -> None:
    marker = uuid.uuid4().hex  # new even in a pytest run by a test: its processes are its own
    os.environ[SESSION_ENV] = marker
    os.environ[TABLE_PREFIX_ENV] = prefix = f"lbctl-test-{marker[:12]}"
    fd, ledger = tempfile.mkstemp(prefix="lbctl-test-labs-", suffix=".txt")
    os.close(fd)
    os.environ[LEDGER_ENV] = ledger
    config.stash[_KEY] = _Session(marker, Path(ledger), nft_tables(), prefix)


def foreign_tables(state: _Session) -> list[str]:
    """lbctl* tables that appeared in the root namespace during the session without its prefix: not
    provably this session's (another session runs on the machine), so only named, never removed."""
    return sorted(nft_tables() - state.tables_before - own_tables(nft_tables(), state.table_prefix))


def find_leaks(state: _Session, grace_s: float = _EXIT_GRACE_S) -> list[tuple[str, str]]:
    """What the session left: (kind, name) pairs; kind is process, netns, link or nft (only tables
    named with this session's prefix: another session's are never counted, so never removed)."""
    deadline = time.monotonic() + grace_s
    own = frozenset({os.getpid()})
    while (processes := session_processes(state.marker, own)) and time.monotonic() < deadline:
        time.sleep(0.1)
    leaks = [("process", f"{pid} {cmdline}") for pid, cmdline in sorted(processes.items())]
    try:
        prefixes = sorted(set(state.ledger.read_text().split()))
    except OSError:
        prefixes = []
    for prefix in prefixes:
        for found in leftovers(prefix):
            kind, _, name = found.partition(" ")
            leaks.append((kind, name))
    leaks += [("nft", table) for table in sorted(own_tables(nft_tables(), state.table_prefix))]
    return leaks


def remove(leaks: list[tuple[str, str]]) -> list[str]:
    """Remove what `find_leaks` found; returns what could not be removed."""
    problems = []
    for kind, name in leaks:  # processes first: they may hold the rest
        try:
            if kind == "process":
                os.kill(int(name.split()[0]), signal.SIGKILL)
            elif kind == "netns":
                subprocess.run(["ip", "netns", "del", name], capture_output=True, check=True)
            elif kind == "link":
                subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)  # may have gone
            elif kind == "nft":
                subprocess.run(["nft", "delete", "table", *name.split()], capture_output=True, check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            problems.append(f"{kind} {name}: {exc}")
    return problems


@pytest.hookimpl(trylast=True)  # after the runner's own pytest_sessionfinish has torn every fixture down
def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash.get(_KEY, None)
    if state is None:
        return
    leaks = find_leaks(state)
    state.ledger.unlink(missing_ok=True)
    foreign = foreign_tables(state)
    if foreign:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"leak check: nftables tables {', '.join(foreign)} appeared in the root namespace "
                                f"during the run without this session's prefix ({state.table_prefix}); "
                                "maybe another session's, so left alone")
    if not leaks:
        return
    problems = remove(leaks)
    lines = ["the test session left these behind (now removed):"]
    lines += [f"  {kind} {name}" for kind, name in leaks]
    if problems:
        lines += ["and could not remove:"] + [f"  {p}" for p in problems]
    lines += ["every process, namespace and table a test or fixture makes must be removed at its teardown,",
              "also when the test fails: register its removal (request.addfinalizer, an ExitStack callback,",
              "Lab.start) right after making it; a table in the root namespace is named with",
              "tests.leakcheck.session_table_prefix()."]
    text = "\n".join(lines)
    # reported like an error at teardown, so it is counted in the summary line and in the exit status
    report = TestReport(nodeid="leak check", location=("tests/leakcheck.py", None, "leak check"), keywords={},
                        outcome="failed", longrepr=text, when="teardown")
    session.config.hook.pytest_runtest_logreport(report=report)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
