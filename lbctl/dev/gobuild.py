"""Build etcd, kube-apiserver and kube-controller-manager from the Go module proxy, once.

Release binaries cannot be downloaded on these machines, and `k8s.io/kubernetes` cannot be
`go install`ed (its go.mod replaces its staging modules with local paths), so each build runs in
a throw-away wrapper module that pins those modules to their published versions. Binaries are
cached under ``~/.cache/lbctl/<versions>/bin``; a second run finds them and builds nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lbctl.dev import versions

BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager")


class BuildError(RuntimeError):
    """The build cannot go on; the message says what to do."""


@dataclass(frozen=True)
class Binaries:
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path


def cache_root() -> Path:
    base = os.environ.get("LBCTL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lbctl"
    )
    return Path(base)


def bin_dir() -> Path:
    return cache_root() / versions.CACHE_KEY / "bin"


def cached_binaries() -> Binaries | None:
    directory = bin_dir()
    paths = [directory / name for name in BINARIES]
    if all(p.is_file() and os.access(p, os.X_OK) for p in paths):
        return Binaries(*paths)
    return None


def staging_replaces(kubernetes_go_mod: str) -> list[str]:
    """The staging module paths that Kubernetes' go.mod maps to ./staging/… (pure)."""
    return sorted(set(re.findall(r"^\s*(k8s\.io/[\w.-]+)\s*=>\s*\./staging/", kubernetes_go_mod, re.M)))


def godebug_line(go_mod: str) -> str | None:
    match = re.search(r"^godebug\s+.*$", go_mod, re.M)
    return match.group(0) if match else None


def kubernetes_wrapper_go_mod(kubernetes_go_mod: str) -> str:
    """go.mod of the wrapper that builds Kubernetes' commands from published modules (pure)."""
    lines = ["module lbctl.local/k8sbuild", "", "go 1.24.0", ""]
    debug = godebug_line(kubernetes_go_mod)
    if debug:
        lines += [debug, ""]
    lines += [f"require k8s.io/kubernetes v{versions.KUBERNETES_VERSION}", "", "replace ("]
    lines += [f"\t{m} => {m} {versions.STAGING_VERSION}" for m in staging_replaces(kubernetes_go_mod)]
    lines += [")", ""]
    return "\n".join(lines)


def etcd_wrapper_go_mod() -> str:
    v = "v" + versions.ETCD_VERSION
    lines = ["module lbctl.local/etcdbuild", "", "go 1.24.0", "", f"require go.etcd.io/etcd/server/v3 {v}", ""]
    lines += ["replace ("] + [f"\t{m} => {m} {v}" for m in versions.ETCD_SIBLING_MODULES] + [")", ""]
    return "\n".join(lines)


def kubernetes_ldflags() -> str:
    major, minor, _ = versions.KUBERNETES_VERSION.split(".")
    pkg = "k8s.io/component-base/version"
    fields = {
        "gitVersion": "v" + versions.KUBERNETES_VERSION,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
    }
    return "-s -w " + " ".join(f"-X {pkg}.{k}={v}" for k, v in fields.items())


def _go() -> str:
    """`LBCTL_GO`, else `go` on PATH, else the official tarball's default place."""
    go = os.environ.get("LBCTL_GO") or shutil.which("go")
    if go is None and os.access("/usr/local/go/bin/go", os.X_OK):
        go = "/usr/local/go/bin/go"
    if go is None or not os.access(go, os.X_OK):
        raise BuildError(
            "no Go toolchain found: install Go ≥ 1.24 (Debian: apt-get install golang-go, or the "
            "official tarball) and put `go` on PATH, then run `lbctl dev build` again"
        )
    return go


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(CGO_ENABLED="0", GOTOOLCHAIN="local", GOFLAGS="-mod=mod -buildvcs=false", GOWORK="off")
    return env


def _run(cmd: Sequence[str], cwd: Path, label: str) -> str:
    """Run a go command, streaming a progress line per batch of compiled packages."""
    print(f"[lbctl build] {label}: {' '.join(cmd[:3])} …", file=sys.stderr, flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(
        list(cmd), cwd=cwd, env=_go_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    tail: list[str] = []
    for count, line in enumerate(proc.stdout, start=1):
        tail = [*tail[-39:], line.rstrip()]
        if count % 100 == 0:
            elapsed = time.monotonic() - started
            print(f"[lbctl build] {label}: {count} packages, {elapsed:.0f}s", file=sys.stderr, flush=True)
    if proc.wait() != 0:
        raise BuildError(
            f"{label} failed (exit {proc.returncode}); last output:\n" + "\n".join(tail)
            + "\nfix the cause above (network access to the Go module proxy, GOPROXY, disk space) and run "
            "`lbctl dev build` again: it resumes from Go's module and build caches"
        )
    print(f"[lbctl build] {label}: done in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    return "\n".join(tail)


def _kubernetes_go_mod(go: str, workdir: Path) -> str:
    out = subprocess.run(
        [go, "mod", "download", "-json", f"k8s.io/kubernetes@v{versions.KUBERNETES_VERSION}"],
        cwd=workdir, env=_go_env(), capture_output=True, text=True,
    )
    if out.returncode != 0:
        raise BuildError(
            f"cannot fetch k8s.io/kubernetes v{versions.KUBERNETES_VERSION} from the Go module proxy:\n"
            f"{out.stdout}{out.stderr}\ncheck GOPROXY and network access to the module proxy"
        )
    info = json.loads(out.stdout)
    return Path(info["GoMod"]).read_text()


def build(force: bool = False) -> Binaries:
    """Build whatever is missing; idempotent."""
    if not force and (found := cached_binaries()) is not None:
        return found
    go = _go()
    target = bin_dir()
    target.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lbctl-gobuild-") as tmp:
        work = Path(tmp)
        staging = work / "out"
        staging.mkdir()
        if force or not (target / "etcd").is_file():
            etcd_dir = work / "etcd"
            etcd_dir.mkdir()
            (etcd_dir / "go.mod").write_text(etcd_wrapper_go_mod())
            _run([go, "mod", "download", "go.etcd.io/etcd/server/v3"], etcd_dir, "etcd: download")
            _run([go, "get", f"go.etcd.io/etcd/server/v3@v{versions.ETCD_VERSION}"], etcd_dir, "etcd: resolve")
            _run([go, "build", "-v", "-trimpath", "-ldflags=-s -w", "-o", str(staging / "etcd"),
                  "go.etcd.io/etcd/server/v3"], etcd_dir, f"etcd v{versions.ETCD_VERSION}")
            os.replace(staging / "etcd", target / "etcd")
        k8s_missing = [b for b in BINARIES[1:] if force or not (target / b).is_file()]
        if k8s_missing:
            k8s_dir = work / "k8s"
            k8s_dir.mkdir()
            (k8s_dir / "go.mod").write_text(kubernetes_wrapper_go_mod(_kubernetes_go_mod(go, k8s_dir)))
            pkgs = [f"k8s.io/kubernetes/cmd/{b}" for b in k8s_missing]
            _run([go, "get", *[f"{p}@v{versions.KUBERNETES_VERSION}" for p in pkgs]], k8s_dir, "kubernetes: resolve")
            _run([go, "build", "-v", "-trimpath", f"-ldflags={kubernetes_ldflags()}", "-o", str(staging) + "/",
                  *pkgs], k8s_dir, f"kubernetes v{versions.KUBERNETES_VERSION}")
            for b in k8s_missing:
                os.replace(staging / b, target / b)
    found = cached_binaries()
    if found is None:
        raise BuildError(f"build finished but binaries are missing in {target}")
    print(f"[lbctl build] all binaries in {target} ({time.monotonic() - started:.0f}s)", file=sys.stderr)
    return found


def main() -> int:
    try:
        build(force="--force" in sys.argv[1:])
    except BuildError as exc:
        print(f"lbctl build: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
