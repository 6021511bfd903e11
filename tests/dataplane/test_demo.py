"""`lbctl demo` end to end: it prints the Service and the page fetched through the VIP, exits 0,
and leaves no namespace, link or process behind — also when interrupted."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbctl.lab.netns import LEDGER_ENV, leftovers
from tests.dataplane.harness import require_root_tools

pytestmark = pytest.mark.dataplane


@contextlib.contextmanager
def labs_made() -> Iterator[list[str]]:
    """The prefixes of the labs made inside the block, as the session's ledger records them (the
    demo's own, and no other lab that may be up on the machine)."""
    ledger = Path(os.environ[LEDGER_ENV])
    start = len(ledger.read_text().splitlines()) if ledger.exists() else 0
    made: list[str] = []
    try:
        yield made
    finally:
        made += ledger.read_text().splitlines()[start:] if ledger.exists() else []


def left_behind(prefixes: list[str]) -> list[str]:
    assert prefixes, "the demo made no lab?"
    return [thing for prefix in prefixes for thing in leftovers(prefix)]


def demo_children(pid: int) -> list[int]:
    """Processes started by the demo still around (by their parent chain)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                status = (proc / "status").read_text()
            except OSError:
                continue
            parent = re.search(r"^PPid:\s+(\d+)", status, re.MULTILINE)
            if parent and int(parent.group(1)) == pid:
                found.append(int(proc.name))
    return found


def test_demo_fetches_a_page_through_the_vip_and_cleans_up() -> None:
    require_root_tools()
    with labs_made() as made:
        proc = subprocess.run([sys.executable, "-m", "lbctl", "demo"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^NAME\s+TYPE\s+CLUSTER-IP\s+EXTERNAL-IP\s+PORT\(S\)\s+AGE$", proc.stdout, re.MULTILINE)
    vip = re.search(r"^hello\s+LoadBalancer\s+\S+\s+(198\.18\.\d+\.\d+)\s+80:\d+/TCP", proc.stdout, re.MULTILINE)
    assert vip, proc.stdout
    assert re.search(r"^Hello from pod hello-[12] on node-[12], through lbctl!", proc.stdout, re.MULTILINE)
    assert left_behind(made) == []


def test_demo_with_bgp_shows_the_routers_multipath_route_and_pages_through_both_nodes() -> None:
    require_root_tools()
    with labs_made() as made:
        proc = subprocess.run([sys.executable, "-m", "lbctl", "demo", "--bgp"], capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    vip = re.search(r"^hello\s+LoadBalancer\s+\S+\s+(198\.19\.240\.\d+)\s+80:\d+/TCP", proc.stdout, re.MULTILINE)
    assert vip, proc.stdout
    assert re.search(r"Paths: \(2 available", proc.stdout), proc.stdout  # one path per node
    assert len(re.findall(r"^\s+nexthop via 198\.18\.\d+\.1[12] dev eth0", proc.stdout, re.MULTILINE)) == 2, proc.stdout
    assert re.search(r"^pages through node-1: \d+, node-2: \d+$", proc.stdout, re.MULTILINE), proc.stdout
    assert "lbctl.io/bgp-announcing-nodes: node-1,node-2" in proc.stdout
    assert left_behind(made) == []


def test_interrupted_demo_cleans_up(request: pytest.FixtureRequest) -> None:
    require_root_tools()
    with labs_made() as made:
        proc = subprocess.Popen([sys.executable, "-m", "lbctl", "demo", "--keep", "120"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        request.addfinalizer(lambda: (proc.kill(), proc.wait()) if proc.poll() is None else None)
        assert proc.stdout is not None
        deadline = time.monotonic() + 180
        for line in proc.stdout:  # interrupt once it is all up
            if "leaving it up" in line or time.monotonic() > deadline:
                break
        children = demo_children(proc.pid)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, rest
    assert "interrupted" in rest and "removing everything" in rest
    assert left_behind(made) == []
    assert children, "the demo started no process?"
    assert not [pid for pid in children if running(pid)]


def running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
