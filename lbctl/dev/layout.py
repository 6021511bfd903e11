"""Where the embedded control plane keeps its files, and the command lines it runs (pure)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Dual-stack, so Services can ask for both families: 65,534 IPv4 ClusterIPs (room for scale runs of
# 10,000+ Services) and the largest IPv6 range the apiserver allows (/108).
SERVICE_CIDR = "10.96.0.0/16,fd00:10:96::/108"
NODE_PORT_RANGE = "30000-54999"  # 25,000 NodePorts
KUBERNETES_SERVICE_IP = "10.96.0.1"
CONTROLLERS = (
    "endpointslice-controller",
    "endpointslice-mirroring-controller",
    "namespace-controller",
    "garbage-collector-controller",
    "serviceaccount-token-controller",
    "serviceaccount-controller",
)
# Token users: the admin (system:masters), the controller-manager, and one with no RBAC grant at
# all, which tests use to prove that authorization is really enforced.
ADMIN_USER = "lbctl-admin"
UNPRIVILEGED_USER = "lbctl-nobody"


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pids(self) -> Path:
        return self.root / "pids"

    @property
    def etcd_data(self) -> Path:
        return self.root / "etcd-data"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def kcm_kubeconfig(self) -> Path:
        return self.root / "kube-controller-manager.kubeconfig"

    @property
    def tokens(self) -> Path:
        return self.pki / "tokens.csv"

    @property
    def cluster_file(self) -> Path:
        return self.root / "cluster.json"

    def log(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    def pid_file(self, component: str) -> Path:
        return self.pids / f"{component}.pid"


@dataclass(frozen=True)
class ClusterInfo:
    """What `up` records in DIR/cluster.json for tests, benchmarks and `env`."""

    server: str
    kubeconfig: str
    ca_file: str
    admin_token: str
    unprivileged_token: str
    service_cidr: str
    node_port_range: str
    etcd_url: str
    kubernetes_version: str
    etcd_version: str
    extra_addresses: list[str] = field(default_factory=list)

    @property
    def node_port_bounds(self) -> tuple[int, int]:
        low, high = self.node_port_range.split("-")
        return int(low), int(high)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ClusterInfo:
        return cls(**json.loads(text))


def etcd_args(binary: Path, layout: Layout, client_port: int, peer_port: int) -> list[str]:
    peer = f"http://127.0.0.1:{peer_port}"
    client = f"http://127.0.0.1:{client_port}"
    return [
        str(binary),
        "--name=lbctl-dev",
        f"--data-dir={layout.etcd_data}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=lbctl-dev={peer}",
        "--unsafe-no-fsync",  # throw-away data: durability buys nothing, fsync costs seconds
        "--quota-backend-bytes=4294967296",
        "--log-level=warn",
    ]


def apiserver_args(
    binary: Path, layout: Layout, etcd_url: str, port: int, bind_address: str
) -> list[str]:
    pki = layout.pki
    return [
        str(binary),
        f"--etcd-servers={etcd_url}",
        f"--bind-address={bind_address}",
        "--advertise-address=127.0.0.1",
        f"--secure-port={port}",
        f"--tls-cert-file={pki / 'apiserver.crt'}",
        f"--tls-private-key-file={pki / 'apiserver.key'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        f"--token-auth-file={layout.tokens}",
        "--authorization-mode=RBAC",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        "--service-account-issuer=https://kubernetes.default.svc",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        f"--service-node-port-range={NODE_PORT_RANGE}",
        "--allow-privileged=true",
        "--max-requests-inflight=800",
        "--max-mutating-requests-inflight=400",
        "--profiling=false",
        "--v=1",
    ]


def controller_manager_args(binary: Path, layout: Layout) -> list[str]:
    pki = layout.pki
    return [
        str(binary),
        f"--kubeconfig={layout.kcm_kubeconfig}",
        f"--controllers={','.join(CONTROLLERS)}",
        f"--service-account-private-key-file={pki / 'sa.key'}",
        f"--root-ca-file={pki / 'ca.crt'}",
        "--leader-elect=false",
        "--use-service-account-credentials",  # each controller with its own RBAC role, as in real clusters
        "--secure-port=0",  # no serving endpoint needed: nothing scrapes it here
        "--kube-api-qps=200",
        "--kube-api-burst=400",
        "--v=1",
    ]


def kubeconfig_yaml(server: str, ca_file: Path, user: str, token: str) -> str:
    # TLS is verified against the generated CA; never insecure-skip-tls-verify.
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "lbctl-dev", "cluster": {"server": server, "certificate-authority": str(ca_file)}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "lbctl-dev", "context": {"cluster": "lbctl-dev", "user": user}}],
            "current-context": "lbctl-dev",
        },
        indent=2,
    )


def tokens_csv(admin_token: str, kcm_token: str, unprivileged_token: str) -> str:
    return "\n".join(
        [
            f'{admin_token},{ADMIN_USER},{ADMIN_USER},"system:masters"',
            f"{kcm_token},system:kube-controller-manager,system:kube-controller-manager",
            f"{unprivileged_token},{UNPRIVILEGED_USER},{UNPRIVILEGED_USER}",
            "",
        ]
    )
