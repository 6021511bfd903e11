"""Teardown steps are idempotent and independent: a Service already gone counts as released, and
every process a fixture started is stopped even when another teardown step fails."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes.client.rest import ApiException

from lbctl.dev import controlplane, processes
from lbctl.dev.layout import Layout
from lbctl.lab.kube import absent_ok
from lbctl.lab.netns import Lab, leftovers
from tests.integration.harness import release_services, stop_process


class GoneMeanwhile:
    """A CoreV1Api stand-in: lists two Services, one of which is deleted by someone else before
    the teardown gets to it (the 404 of issue 13)."""

    def __init__(self) -> None:
        self.services = {"a", "b"}
        self.deleted: list[str] = []

    def list_namespaced_service(self, namespace: str) -> Any:
        listed = [SimpleNamespace(metadata=SimpleNamespace(name=n)) for n in sorted(self.services)]
        self.services.discard("a")  # gone between the list and the delete
        return SimpleNamespace(items=listed)

    def delete_namespaced_service(self, name: str, namespace: str) -> None:
        if name not in self.services:
            raise ApiException(status=404, reason="Not Found")
        self.services.discard(name)
        self.deleted.append(name)


def test_a_service_already_gone_counts_as_released() -> None:
    core = GoneMeanwhile()
    release_services(core, "t-ns", timeout=2)  # type: ignore[arg-type]
    assert core.deleted == ["b"] and not core.services


class Broken(GoneMeanwhile):
    def delete_namespaced_service(self, name: str, namespace: str) -> None:
        raise ApiException(status=500, reason="boom")


def test_other_errors_on_delete_are_not_swallowed() -> None:
    with pytest.raises(ApiException):
        release_services(Broken(), "t-ns", timeout=2)  # type: ignore[arg-type]


def test_a_teardown_delete_of_something_already_gone_succeeds_and_other_errors_raise() -> None:
    core = GoneMeanwhile()
    core.services.discard("a")
    for _ in range(2):  # idempotent: the second run finds "b" gone too
        absent_ok(lambda: core.delete_namespaced_service("a", "t-ns"))
        absent_ok(lambda: core.delete_namespaced_service("b", "t-ns"))
    assert core.deleted == ["b"]
    with pytest.raises(ApiException):
        absent_ok(lambda: Broken().delete_namespaced_service("a", "t-ns"))


def fail() -> None:
    raise RuntimeError("teardown step failed")


def test_each_process_is_stopped_even_when_a_teardown_step_fails() -> None:
    procs = []
    with pytest.raises(RuntimeError, match="teardown step failed"), contextlib.ExitStack() as stops:
        for _ in range(2):
            proc = subprocess.Popen(["sleep", "600"])
            stops.callback(stop_process, proc)
            procs.append(proc)
        stops.callback(fail)
    assert [p.poll() for p in procs] == [-15, -15]  # both SIGTERMed, the failing step notwithstanding


def test_a_lab_undoes_everything_it_made_even_what_someone_removed_first() -> None:
    prefix = f"lbxu{secrets.token_hex(2)[:3]}"
    lab = Lab(prefix=prefix)
    try:
        lab.add_namespace("a")
        lab.add_namespace("b")
        proc = lab.start(None, ["sleep", "600"], "sleep.log")
        subprocess.run(["ip", "netns", "del", f"{prefix}-a"], check=True)  # gone already: not a problem
    finally:
        problems = lab.close()
    assert problems == []
    assert proc.poll() is not None
    assert lab.namespaces == [] and lab.processes == []
    assert leftovers(prefix) == []


def test_control_plane_down_stops_every_component_when_one_cannot_be_stopped(tmp_path: Path) -> None:
    lay = Layout(tmp_path.resolve())
    started = {}
    for component in ("etcd", "kube-controller-manager"):
        started[component] = processes.spawn(["sleep", "600"], tmp_path / f"{component}.log", lay.pid_file(component))
    lay.pid_file("kube-apiserver").mkdir(parents=True)  # a pid "file" that cannot be read or removed
    records = [processes.read(lay.pid_file(c)) for c in started]
    try:
        with pytest.raises(RuntimeError, match="kube-apiserver"):
            controlplane.down(tmp_path)
        # down() reaps its own children, so their exit codes are gone: ask /proc instead
        assert [processes.is_alive(r) for r in records if r is not None] == [False, False]
    finally:
        for proc in started.values():
            stop_process(proc)
