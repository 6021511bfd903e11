"""`lbctl dev up|down|env|build` as a user runs them, including every way they can go wrong."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbctl.dev import gobuild


def lbctl(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbctl", *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def processes_mentioning(text: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.fixture
def dev_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "dev"
    try:
        yield directory
    finally:
        lbctl("dev", "down", "--dir", str(directory))


def test_up_env_down_round_trip_leaves_no_process(dev_dir: Path) -> None:
    started = lbctl("dev", "up", "--dir", str(dev_dir))
    assert started.returncode == 0, started.stderr
    kubeconfig = dev_dir.resolve() / "kubeconfig"
    assert started.stdout.strip() == f"export KUBECONFIG={kubeconfig}"
    recorded = json.loads((dev_dir / "cluster.json").read_text())
    assert recorded["service_cidr"] == "10.96.0.0/16,fd00:10:96::/108"
    assert recorded["node_port_range"] == "30000-54999"
    config = json.loads(kubeconfig.read_text())
    assert "insecure-skip-tls-verify" not in json.dumps(config)
    assert len(processes_mentioning(str(dev_dir.resolve()))) == 3

    again = lbctl("dev", "up", "--dir", str(dev_dir))
    assert again.returncode == 1
    assert "already holds a running control plane" in again.stderr and "lbctl dev down" in again.stderr

    env = lbctl("dev", "env", "--dir", str(dev_dir))
    assert env.returncode == 0 and env.stdout.strip() == f"export KUBECONFIG={kubeconfig}"

    stopped = lbctl("dev", "down", "--dir", str(dev_dir))
    assert stopped.returncode == 0
    assert processes_mentioning(str(dev_dir.resolve())) == []
    assert not list((dev_dir / "pids").iterdir())
    gone = lbctl("dev", "env", "--dir", str(dev_dir))
    assert gone.returncode == 1 and "no control plane is running" in gone.stderr


def test_a_stale_pid_file_is_cleaned_up_and_does_not_block_up(dev_dir: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    (dev_dir / "pids").mkdir(parents=True)
    (dev_dir / "pids" / "kube-apiserver.pid").write_text(
        json.dumps({"pid": dead.pid, "start_ticks": 1, "argv0": "kube-apiserver"})
    )
    started = lbctl("dev", "up", "--dir", str(dev_dir))
    assert started.returncode == 0, started.stderr
    assert "stale pid file" in started.stderr


def test_a_port_in_use_is_named_and_nothing_starts(dev_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = lbctl("dev", "up", "--dir", str(dev_dir), "--apiserver-port", str(port))
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr and "--apiserver-port" in result.stderr
    assert processes_mentioning(str(dev_dir.resolve())) == []


def test_a_start_that_fails_midway_leaves_nothing_running(dev_dir: Path) -> None:
    result = lbctl("dev", "up", "--dir", str(dev_dir), "--timeout", "0.05")
    assert result.returncode == 1
    assert "not ready after" in result.stderr
    assert processes_mentioning(str(dev_dir.resolve())) == []
    assert not [p for p in (dev_dir / "pids").iterdir()]


def test_no_go_toolchain_is_reported_with_what_to_do(tmp_path: Path) -> None:
    result = lbctl("dev", "build", env={"LBCTL_CACHE_DIR": str(tmp_path), "LBCTL_GO": str(tmp_path / "no-go")})
    assert result.returncode == 1
    assert "no Go toolchain found" in result.stderr and "lbctl dev build" in result.stderr


def test_a_failing_build_says_so_and_caches_nothing(tmp_path: Path) -> None:
    offline = {
        "LBCTL_CACHE_DIR": str(tmp_path / "cache"), "GOPROXY": "off", "GOMODCACHE": str(tmp_path / "mod"),
        "GOFLAGS": "-mod=mod",
    }
    result = lbctl("dev", "build", env=offline)
    assert result.returncode == 1
    assert "etcd: download failed" in result.stderr
    assert "GOPROXY=off" in result.stderr  # go's own reason is passed through
    assert "run `lbctl dev build` again" in result.stderr
    assert not any((tmp_path / "cache").rglob("etcd"))


def test_a_second_build_builds_nothing(cluster: object) -> None:
    # The session's control plane already built the binaries; without a Go toolchain at all,
    # build() must still succeed from the cache.
    previous = os.environ.get("LBCTL_GO")
    os.environ["LBCTL_GO"] = "/nonexistent/go"
    try:
        found = gobuild.build()
    finally:
        os.environ.pop("LBCTL_GO") if previous is None else os.environ.update(LBCTL_GO=previous)
    assert found.kube_apiserver.is_file() and os.access(found.etcd, os.X_OK)
