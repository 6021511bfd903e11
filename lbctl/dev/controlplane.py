"""`lbctl dev up|down|env`: a real etcd + kube-apiserver + kube-controller-manager on 127.0.0.1.

`up` builds what is missing, starts the three processes with free ports, waits until the
apiserver is ready and the controller-manager is working, and records everything in DIR. If any
step fails, whatever it started is stopped again: nothing is left half-started.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from lbctl.dev import gobuild, layout, processes, versions
from lbctl.dev.layout import ClusterInfo, Layout

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager")
DEFAULT_DIR = Path(".lbctl/dev")


class ControlPlaneError(RuntimeError):
    """`up`/`down` cannot go on; the message says what to do."""


def _log(message: str) -> None:
    print(f"[lbctl dev] {message}", file=sys.stderr, flush=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _check_port_free(host: str, port: int, flag: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ControlPlaneError(
                f"port {port} on {host} is in use ({exc.strerror}); pick another with {flag} "
                "or leave it out to use a free one"
            ) from exc


def running(lay: Layout) -> dict[str, processes.PidRecord]:
    found: dict[str, processes.PidRecord] = {}
    for component in COMPONENTS:
        record = processes.read(lay.pid_file(component))
        if record is not None and processes.is_alive(record):
            found[component] = record
    return found


def read_info(directory: Path) -> ClusterInfo:
    lay = Layout(directory.resolve())
    if not running(lay):
        raise ControlPlaneError(
            f"no control plane is running in {lay.root}; start one with `lbctl dev up --dir {directory}`"
        )
    try:
        return ClusterInfo.from_json(lay.cluster_file.read_text())
    except (OSError, ValueError, TypeError) as exc:
        raise ControlPlaneError(
            f"{lay.cluster_file} is missing or unreadable ({exc}); run `lbctl dev down` and `up`"
        ) from exc


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait(
    lay: Layout, component: str, proc_check: processes.PidRecord, probe: Callable[[], bool], timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not processes.is_alive(proc_check):
            raise ControlPlaneError(
                f"{component} exited during start-up; its log ({lay.log(component)}) ends with:\n"
                f"{_tail(lay.log(component))}"
            )
        if probe():
            return
        time.sleep(0.1)
    raise ControlPlaneError(
        f"{component} not ready after {timeout_s:.0f}s; its log ({lay.log(component)}) ends with:\n"
        f"{_tail(lay.log(component))}"
    )


def _http_ok(url: str, context: ssl.SSLContext | None = None, token: str | None = None) -> bool:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def up(
    directory: Path = DEFAULT_DIR,
    *,
    apiserver_port: int | None = None,
    extra_addresses: tuple[str, ...] = (),
    timeout_s: float = 90.0,
    apiserver_flags: tuple[str, ...] = (),
) -> ClusterInfo:
    """Start a control plane in `directory`; extra_addresses are also served (and in the cert);
    apiserver_flags are appended to kube-apiserver's command line (tests that need, say, a short
    watch history pass `--watch-cache=false --etcd-compaction-interval=2s`)."""
    lay = Layout(directory.resolve())
    already = running(lay)
    if already:
        pids = ", ".join(f"{c} pid {r.pid}" for c, r in already.items())
        raise ControlPlaneError(
            f"{lay.root} already holds a running control plane ({pids}); use it with "
            f"`lbctl dev env --dir {directory}`, stop it with `lbctl dev down --dir {directory}`, or pick another --dir"
        )
    for component in COMPONENTS:  # pid files of processes that are gone
        if lay.pid_file(component).exists():
            _log(processes.stop(lay.pid_file(component)))

    bind = "0.0.0.0" if extra_addresses else "127.0.0.1"
    if apiserver_port is not None:
        _check_port_free(bind, apiserver_port, "--apiserver-port")
    try:
        binaries = gobuild.build()
    except gobuild.BuildError as exc:
        raise ControlPlaneError(str(exc)) from exc

    started = time.monotonic()
    for sub in (lay.pki, lay.logs, lay.pids):
        sub.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(lay.etcd_data, ignore_errors=True)  # every `up` is a fresh cluster
    for component in COMPONENTS:
        lay.log(component).unlink(missing_ok=True)

    # Certificates and tokens.
    from lbctl.dev import pki  # cryptography: only for a control plane being set up

    pki.ensure_ca(lay.pki)
    pki.issue_serving_cert(
        lay.pki, "apiserver", ips=["127.0.0.1", layout.KUBERNETES_SERVICE_IP, *extra_addresses],
        dns_names=["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                   "kubernetes.default.svc.cluster.local"],
    )
    pki.ensure_signing_key_pair(lay.pki, "sa")
    admin_token, kcm_token, nobody_token = (secrets.token_hex(16) for _ in range(3))
    lay.tokens.write_text(layout.tokens_csv(admin_token, kcm_token, nobody_token))
    lay.tokens.chmod(0o600)

    port = apiserver_port or free_port(bind)
    server = f"https://127.0.0.1:{port}"
    ca_file = lay.pki / "ca.crt"
    lay.kubeconfig.write_text(layout.kubeconfig_yaml(server, ca_file, layout.ADMIN_USER, admin_token))
    lay.kubeconfig.chmod(0o600)
    lay.kcm_kubeconfig.write_text(
        layout.kubeconfig_yaml(server, ca_file, "system:kube-controller-manager", kcm_token)
    )
    for address in extra_addresses:  # kubeconfigs for clients that reach the apiserver elsewhere
        (lay.root / f"kubeconfig-{address}").write_text(
            layout.kubeconfig_yaml(f"https://{address}:{port}", ca_file, layout.ADMIN_USER, admin_token)
        )

    tls = ssl.create_default_context(cafile=str(ca_file))
    try:
        etcd_client, etcd_peer = free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_client}"
        _log(f"starting etcd v{versions.ETCD_VERSION} on {etcd_url}")
        processes.spawn(
            layout.etcd_args(binaries.etcd, lay, etcd_client, etcd_peer), lay.log("etcd"), lay.pid_file("etcd")
        )
        _wait(lay, "etcd", _record(lay, "etcd"), lambda: _http_ok(f"{etcd_url}/health"), timeout_s)

        _log(f"starting kube-apiserver v{versions.KUBERNETES_VERSION} on {server}")
        processes.spawn(
            [*layout.apiserver_args(binaries.kube_apiserver, lay, etcd_url, port, bind), *apiserver_flags],
            lay.log("kube-apiserver"), lay.pid_file("kube-apiserver"),
        )
        _wait(
            lay, "kube-apiserver", _record(lay, "kube-apiserver"),
            lambda: _http_ok(f"{server}/readyz", tls, admin_token), timeout_s,
        )

        _log("starting kube-controller-manager")
        processes.spawn(
            layout.controller_manager_args(binaries.kube_controller_manager, lay),
            lay.log("kube-controller-manager"), lay.pid_file("kube-controller-manager"),
        )
        # The serviceaccount controller creating default/default proves the controllers run.
        _wait(
            lay, "kube-controller-manager", _record(lay, "kube-controller-manager"),
            lambda: _http_ok(f"{server}/api/v1/namespaces/default/serviceaccounts/default", tls, admin_token),
            timeout_s,
        )
    except BaseException:
        for component in reversed(COMPONENTS):
            if lay.pid_file(component).exists():
                processes.stop(lay.pid_file(component))
        raise

    info = ClusterInfo(
        server=server, kubeconfig=str(lay.kubeconfig), ca_file=str(ca_file), admin_token=admin_token,
        unprivileged_token=nobody_token, service_cidr=layout.SERVICE_CIDR, node_port_range=layout.NODE_PORT_RANGE,
        etcd_url=etcd_url, kubernetes_version=versions.KUBERNETES_VERSION, etcd_version=versions.ETCD_VERSION,
        extra_addresses=list(extra_addresses),
    )
    lay.cluster_file.write_text(info.to_json())
    _log(f"ready in {time.monotonic() - started:.1f}s")
    return info


def _record(lay: Layout, component: str) -> processes.PidRecord:
    record = processes.read(lay.pid_file(component))
    if record is None:
        raise ControlPlaneError(f"{component} did not record its pid in {lay.pid_file(component)}")
    return record


def down(directory: Path = DEFAULT_DIR) -> list[str]:
    """Stop exactly what `up` started in `directory`; returns one line per component."""
    lay = Layout(directory.resolve())
    outcomes = []
    failures: list[str] = []
    # one component that cannot be stopped must not leave the others running
    for component in reversed(COMPONENTS):
        if lay.pid_file(component).exists():
            try:
                outcomes.append(processes.stop(lay.pid_file(component)))
            except OSError as exc:
                failures.append(f"{component}: {exc}")
    if failures:
        raise RuntimeError(f"could not stop {'; '.join(failures)} (stopped: {outcomes})")
    if not outcomes:
        outcomes.append(f"nothing to stop in {lay.root}")
    return outcomes


def env_lines(info: ClusterInfo) -> list[str]:
    return [f"export KUBECONFIG={info.kubeconfig}"]

