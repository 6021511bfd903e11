"""Build Helm from the Go module proxy, once, for the chart's tests (`helm lint`, `helm template`).

Release binaries cannot be downloaded on these machines; `helm.sh/helm/v3` has no local replaces,
so `go install …/cmd/helm@vX` builds it (about 3 minutes on 2 cores the first time). The binary is
cached under ``~/.cache/lbctl/helm-<v>/bin/helm`` like the control plane's.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from lbctl.dev import gobuild

HELM_VERSION = "3.22.0"
HELM_MODULE = "helm.sh/helm/v3"
# the Kubernetes version helm assumes without a cluster (its Makefile sets it from its client-go, v0.37)
HELM_K8S_VERSION = ("1", "37")


def helm_path() -> Path:
    return gobuild.cache_root() / f"helm-{HELM_VERSION}" / "bin" / "helm"


def cached_helm() -> Path | None:
    path = helm_path()
    return path if path.is_file() and os.access(path, os.X_OK) else None


def build(force: bool = False) -> Path:
    """The helm binary, built if missing; idempotent."""
    if not force and (found := cached_helm()) is not None:
        return found
    go = gobuild._go()
    target = helm_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    major, minor = HELM_K8S_VERSION
    ldflags = " ".join([f"-s -w -X {HELM_MODULE}/internal/version.version=v{HELM_VERSION}",
                        *(f"-X {HELM_MODULE}/pkg/{pkg}.k8sVersion{part}={value}" for pkg in ("lint/rules", "chartutil")
                          for part, value in (("Major", major), ("Minor", minor)))])
    with tempfile.TemporaryDirectory(prefix="lbctl-helmbuild-") as tmp:
        staging = Path(tmp) / "bin"
        staging.mkdir()
        # gobuild._run hands the go command this process's environment: GOBIN goes through it
        previous = os.environ.get("GOBIN")
        os.environ["GOBIN"] = str(staging)
        try:
            gobuild._run([go, "install", "-trimpath", f"-ldflags={ldflags}", f"{HELM_MODULE}/cmd/helm@v{HELM_VERSION}"],
                         Path(tmp), f"helm v{HELM_VERSION}")
        finally:
            if previous is None:
                os.environ.pop("GOBIN", None)
            else:
                os.environ["GOBIN"] = previous
        os.replace(staging / "helm", target)
    print(f"[lbctl build] helm in {target} ({time.monotonic() - started:.0f}s)", file=sys.stderr)
    return target


def main() -> int:
    try:
        print(build(force="--force" in sys.argv[1:]))
    except gobuild.BuildError as exc:
        print(f"lbctl helm build: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
