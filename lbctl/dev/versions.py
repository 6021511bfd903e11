"""The one place that pins the embedded control plane's versions."""

from __future__ import annotations

KUBERNETES_VERSION = "1.34.4"
ETCD_VERSION = "3.6.16"

# Kubernetes' go.mod replaces its staging modules (k8s.io/api, …) with local paths; a wrapper
# module must point each one at its published version, which is v0.<minor>.<patch>.
STAGING_VERSION = "v0." + KUBERNETES_VERSION.split(".", 1)[1]

# etcd's server module replaces its sibling modules with ../ paths in the same way.
ETCD_SIBLING_MODULES = (
    "go.etcd.io/etcd/api/v3",
    "go.etcd.io/etcd/client/pkg/v3",
    "go.etcd.io/etcd/client/v3",
    "go.etcd.io/etcd/pkg/v3",
)

CACHE_KEY = f"k8s-{KUBERNETES_VERSION}_etcd-{ETCD_VERSION}"
