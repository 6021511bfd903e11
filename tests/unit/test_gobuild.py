"""The wrapper modules that build Kubernetes and etcd from published Go modules."""

from __future__ import annotations

import pytest

from lbctl.dev import gobuild, versions

KUBERNETES_GO_MOD = """module k8s.io/kubernetes

go 1.24.0

godebug default=go1.24

require (
	k8s.io/api v0.0.0
	github.com/x/y v1.0.0
)

replace (
	k8s.io/api => ./staging/src/k8s.io/api
	k8s.io/apimachinery => ./staging/src/k8s.io/apimachinery
	k8s.io/component-base => ./staging/src/k8s.io/component-base
	github.com/other => github.com/fork v1.2.3
)
"""


def test_staging_replaces_are_read_from_kubernetes_go_mod() -> None:
    assert gobuild.staging_replaces(KUBERNETES_GO_MOD) == [
        "k8s.io/api", "k8s.io/apimachinery", "k8s.io/component-base",
    ]


def test_the_wrapper_pins_every_staging_module_and_copies_godebug() -> None:
    wrapper = gobuild.kubernetes_wrapper_go_mod(KUBERNETES_GO_MOD)
    assert "godebug default=go1.24" in wrapper
    assert f"require k8s.io/kubernetes v{versions.KUBERNETES_VERSION}" in wrapper
    for module in ("k8s.io/api", "k8s.io/apimachinery", "k8s.io/component-base"):
        assert f"{module} => {module} {versions.STAGING_VERSION}" in wrapper
    assert "github.com/other" not in wrapper


def test_the_staging_version_follows_the_kubernetes_version() -> None:
    major, minor, patch = versions.KUBERNETES_VERSION.split(".")
    assert versions.STAGING_VERSION == f"v0.{minor}.{patch}" and major == "1"
    assert int(minor) >= 34


def test_etcd_wrapper_pins_its_sibling_modules() -> None:
    wrapper = gobuild.etcd_wrapper_go_mod()
    assert versions.ETCD_VERSION.startswith("3.6.")
    for module in versions.ETCD_SIBLING_MODULES:
        assert f"{module} => {module} v{versions.ETCD_VERSION}" in wrapper


@pytest.mark.parametrize("field", ["gitVersion", "gitMajor", "gitMinor"])
def test_version_is_stamped_into_kubernetes_binaries(field: str) -> None:
    assert f"-X k8s.io/component-base/version.{field}=" in gobuild.kubernetes_ldflags()
