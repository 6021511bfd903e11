"""`.ci/setup` when a step cannot be done — no package index, no Go: it names the failed step and
what to do, exits non-zero, and leaves nothing half-installed that trips the next run.

Never against the machine's own environment: the Python step installs into a throw-away venv
(LBCTL_SETUP_PYTHON), as on a fresh machine (it bootstraps uv there too), and the control-plane step
builds into an empty cache (LBCTL_CACHE_DIR)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNREACHABLE = "http://127.0.0.1:9/"  # the discard port: nothing listens, the connection is refused at once


@pytest.fixture
def venv(tmp_path: Path) -> Iterator[Path]:
    """A throw-away interpreter to install into; removed at the end (it holds a few hundred MB)."""
    path = tmp_path / "venv"
    try:
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def setup(venv: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / ".ci" / "setup")], capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        # symlinks into uv's cache: the venv costs no copy of the packages
        env={**os.environ, "LBCTL_SETUP_PYTHON": str(venv / "bin" / "python"), "UV_LINK_MODE": "symlink", **env},
    )


def packages(venv: Path) -> set[str]:
    """The distributions installed in the venv: name-version."""
    site = next((venv / "lib").glob("python3*/site-packages"))
    return {p.name.removesuffix(".dist-info") for p in site.iterdir() if p.name.endswith(".dist-info")}


def test_without_the_package_index_setup_names_the_step_and_a_second_run_completes(
    venv: Path, tmp_path: Path
) -> None:
    fresh = packages(venv)  # pip, setuptools
    no_index = setup(venv, PIP_INDEX_URL=UNREACHABLE, PIP_RETRIES="0", UV_INDEX_URL=UNREACHABLE,
                     UV_DEFAULT_INDEX=UNREACHABLE)
    assert no_index.returncode == 1, no_index.stderr
    assert "[setup] FAILED in step '2/3 Python packages': pip could not install uv" in no_index.stderr
    assert "check network access to PyPI (or the mirror in PIP_INDEX_URL)" in no_index.stderr
    assert "run `bash .ci/setup` again" in no_index.stderr
    assert packages(venv) == fresh

    # pip reaches the index, uv does not (and its cache is empty): uv is there, none of the lock
    no_uv_index = setup(venv, UV_INDEX_URL=UNREACHABLE, UV_DEFAULT_INDEX=UNREACHABLE,
                        UV_CACHE_DIR=str(tmp_path / "empty-uv-cache"))
    assert no_uv_index.returncode == 1, no_uv_index.stderr
    assert ("[setup] FAILED in step '2/3 Python packages': uv could not install requirements-dev.lock"
            in no_uv_index.stderr), no_uv_index.stderr
    assert "check network access to PyPI (or the mirror in UV_INDEX_URL)" in no_uv_index.stderr
    assert "127.0.0.1:9" in no_uv_index.stderr  # the cause, from uv's own output
    assert {p.split("-")[0] for p in packages(venv) - fresh} == {"uv"}, "a failed download installed part of the lock"

    again = setup(venv)  # the index is back: the same command finishes the job
    assert again.returncode == 0, again.stderr
    names = {p.split("-")[0] for p in packages(venv)}
    assert {"kopf", "moto", "pytest", "lbctl"} <= names
    assert "[setup] 3/3 Go builds: the control plane (etcd, kube-apiserver, kube-controller-manager) and helm: ok" \
        in again.stderr


def test_without_go_setup_names_the_build_step_and_builds_nothing(venv: Path, tmp_path: Path) -> None:
    cache = tmp_path / "empty-lbctl-cache"
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "go").exists())
    failed = setup(venv, PATH=path, LBCTL_GO=str(tmp_path / "no-go"), LBCTL_CACHE_DIR=str(cache))
    assert failed.returncode == 1, failed.stderr
    assert "[setup] 2/3 Python packages: ok" in failed.stderr
    assert "[setup] FAILED in step '3/3 Go builds" in failed.stderr, failed.stderr
    assert "the control-plane build and the helm build failed" in failed.stderr
    assert "no Go toolchain found: install Go ≥ 1.24" in failed.stderr
    assert "install Go >= 1.24 on PATH" in failed.stderr and "run `bash .ci/setup` again" in failed.stderr
    assert not [p for p in cache.rglob("*") if p.is_file()], "a failed build left files in the cache"
