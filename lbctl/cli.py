"""The `lbctl` command line: one entry point for the operator, the forwarder and the dev tools."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lbctl.dev import controlplane, gobuild
from lbctl.model.meta import LOCAL_CLASS
from lbctl.operator import defaults
from lbctl.report import cli as report_cli


def _dev_up(args: argparse.Namespace) -> int:
    info = controlplane.up(
        Path(args.dir), apiserver_port=args.apiserver_port, extra_addresses=tuple(args.extra_address),
        timeout_s=args.timeout,
    )
    print("\n".join(controlplane.env_lines(info)))
    return 0


def _dev_down(args: argparse.Namespace) -> int:
    for line in controlplane.down(Path(args.dir)):
        print(f"[lbctl dev] {line}", file=sys.stderr)
    return 0


def _dev_env(args: argparse.Namespace) -> int:
    print("\n".join(controlplane.env_lines(controlplane.read_info(Path(args.dir)))))
    return 0


def _dev_build(args: argparse.Namespace) -> int:
    binaries = gobuild.build(force=args.force)
    print(binaries.kube_apiserver.parent)
    return 0


def _env(name: str, default: str | None = None) -> str | None:
    """LBCTL_<name>, else the default. As a flag's default it goes through the flag's `type`
    like a command-line value (argparse converts string defaults), so bad values are reported alike."""
    return os.environ.get(f"LBCTL_{name}", default)


def _env_list(name: str) -> list[str]:
    """LBCTL_<name> as a comma-separated list."""
    return [item.strip() for item in (_env(name) or "").split(",") if item.strip()]


def _env_flag(name: str) -> bool:
    return (_env(name) or "").lower() in ("1", "true", "yes", "on")


def _port_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        bounds = int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port range like 30000-32767") from None
    if not 0 < bounds[0] <= bounds[1] < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port range like 30000-32767")
    return bounds


def _provider_options(args: argparse.Namespace) -> dict[str, str]:
    options = dict(args.provider_option)
    options.update({k: v for k, v in {
        "region": args.region, "endpoint_url": args.aws_endpoint_url, "endpoint": args.gce_endpoint,
        "project": args.project, "network": args.network,
    }.items() if v})
    return options


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def _add_provider_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--provider", default=_env("PROVIDER", "local"), help="local, aws or gce (LBCTL_PROVIDER)")
    parser.add_argument("--cluster-name", default=_env("CLUSTER_NAME", "kubernetes"),
                        help="tags cloud resources kubernetes.io/cluster/<name> (LBCTL_CLUSTER_NAME)")
    parser.add_argument("--class", dest="lb_class", default=_env("CLASS"),
                        help="spec.loadBalancerClass handled (default lbctl.io/<provider>; LBCTL_CLASS)")
    parser.add_argument("--default-class", action="store_true", default=_env_flag("DEFAULT_CLASS"),
                        help="also handle Services without a loadBalancerClass (LBCTL_DEFAULT_CLASS)")
    parser.add_argument("--namespace", action="append",
                        default=[n for n in (_env("NAMESPACE") or "").split(",") if n],
                        help="only these namespaces (repeatable; LBCTL_NAMESPACE=a,b); default all")
    parser.add_argument("--kubeconfig", default=_env("KUBECONFIG"), help="default $KUBECONFIG, then in-cluster")
    parser.add_argument("--region", default=_env("REGION"), help="aws/gce region (LBCTL_REGION)")
    parser.add_argument("--aws-endpoint-url", default=_env("AWS_ENDPOINT_URL"),
                        help="AWS endpoint override (also AWS_ENDPOINT_URL, boto3's own variable)")
    parser.add_argument("--gce-endpoint", default=_env("GCE_ENDPOINT"), help="Compute endpoint override")
    parser.add_argument("--project", default=_env("PROJECT"), help="gce project (LBCTL_PROJECT)")
    parser.add_argument("--network", default=_env("NETWORK"), help="gce network (LBCTL_NETWORK)")
    parser.add_argument("--provider-option", type=_key_value, action="append", metavar="KEY=VALUE",
                        default=[_key_value(o) for o in (_env("PROVIDER_OPTIONS") or "").split(",") if o],
                        help="any other provider setting (repeatable; LBCTL_PROVIDER_OPTIONS=k=v,k=v)")
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "info"), help="debug, info, warning")


def _logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kopf").setLevel(logging.WARNING)


def _operator(args: argparse.Namespace) -> int:
    from lbctl.operator.app import OperatorConfig, run

    config = OperatorConfig(
        provider=args.provider, cluster_name=args.cluster_name, lb_class=args.lb_class,
        default_class=args.default_class, namespaces=tuple(args.namespace), kubeconfig=args.kubeconfig,
        provider_options=_provider_options(args), workers=args.workers, node_port_range=args.node_port_range,
        gc_interval_s=args.gc_interval, resync_interval_s=args.resync_interval, metrics_port=args.metrics_port,
        liveness_endpoint=args.liveness_endpoint, leader_elect=args.leader_elect, lease_name=args.leader_elect_lease,
        lease_namespace=args.leader_elect_namespace, lease_duration_s=args.leader_elect_lease_duration,
        renew_deadline_s=args.leader_elect_renew_deadline, retry_period_s=args.leader_elect_retry_period,
    )
    try:
        config.election_timing.check()
    except ValueError as exc:
        print(f"lbctl operator: {exc}", file=sys.stderr)
        return 2
    _logging(args.log_level)
    asyncio.run(run(config))
    return 0


def _add_operator(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    op = commands.add_parser(
        "operator", help="run the operator (every flag also reads LBCTL_<FLAG>, e.g. LBCTL_PROVIDER)")
    _add_provider_args(op)
    op.add_argument("--workers", type=int, default=_env("WORKERS", str(defaults.WORKERS)), help="concurrent syncs")
    op.add_argument("--node-port-range", type=_port_range,
                    default=_env("NODE_PORT_RANGE", defaults.port_range_text(defaults.NODE_PORT_RANGE)),
                    help="the apiserver's --service-node-port-range (for claiming NodePorts)")
    op.add_argument("--gc-interval", type=float, default=_env("GC_INTERVAL", str(defaults.GC_INTERVAL_S)),
                    help="seconds between orphan sweeps")
    op.add_argument("--resync-interval", type=float, default=_env("RESYNC_INTERVAL", str(defaults.RESYNC_INTERVAL_S)),
                    help="seconds between full re-syncs of every Service")
    op.add_argument("--metrics-port", type=int, default=_env("METRICS_PORT", "0"),
                    help="serve Prometheus metrics on this port (0: off)")
    op.add_argument("--liveness-endpoint", default=_env("LIVENESS_ENDPOINT"),
                    help="kopf liveness probe endpoint, e.g. http://0.0.0.0:8080/healthz")
    op.add_argument("--leader-elect", action=argparse.BooleanOptionalAction, default=_env_flag("LEADER_ELECT"),
                    help="run as one of several replicas: only the holder of a Lease acts (LBCTL_LEADER_ELECT)")
    op.add_argument("--leader-elect-lease", default=_env("LEADER_ELECT_LEASE", defaults.LEASE_NAME),
                    help="the Lease's name (LBCTL_LEADER_ELECT_LEASE)")
    op.add_argument("--leader-elect-namespace",
                    default=_env("LEADER_ELECT_NAMESPACE", os.environ.get("POD_NAMESPACE", defaults.LEASE_NAMESPACE)),
                    help="the Lease's namespace (LBCTL_LEADER_ELECT_NAMESPACE, else POD_NAMESPACE, else lbctl-system)")
    op.add_argument("--leader-elect-lease-duration", type=int,
                    default=_env("LEADER_ELECT_LEASE_DURATION", str(defaults.LEASE_DURATION_S)),
                    help="seconds a standby waits after the Lease last changed before taking it")
    op.add_argument("--leader-elect-renew-deadline", type=float,
                    default=_env("LEADER_ELECT_RENEW_DEADLINE", str(defaults.RENEW_DEADLINE_S)),
                    help="seconds the leader may fail to renew before it stops acting (< lease duration)")
    op.add_argument("--leader-elect-retry-period", type=float,
                    default=_env("LEADER_ELECT_RETRY_PERIOD", str(defaults.RETRY_PERIOD_S)),
                    help="seconds between attempts to renew or acquire the Lease")
    op.set_defaults(func=_operator)


def _gc(args: argparse.Namespace) -> int:
    from lbctl.gc import sweep
    from lbctl.kube.client import KubeClient
    from lbctl.model.scope import Scope, default_class
    from providers import registry
    from providers.base import ProviderSettings

    _logging(args.log_level)

    async def run() -> int:
        provider = registry.load(args.provider, ProviderSettings(args.cluster_name, _provider_options(args)))
        client = KubeClient.from_kubeconfig(args.kubeconfig, user_agent="lbctl-gc")
        scope = Scope(args.lb_class or default_class(args.provider), args.default_class, frozenset(args.namespace))
        try:
            found = await sweep(provider, client, scope, delete=args.delete)
        finally:
            await client.close()
            await provider.close()
        verb = "deleted" if args.delete else "orphaned"
        for ref in found:
            print(f"{verb}\t{ref.name}\t{ref.service_key}\tuid={ref.uid or '-'}")
        if not found:
            print(f"no orphaned {args.provider} load balancers for cluster {args.cluster_name}", file=sys.stderr)
        return 0

    return asyncio.run(run())


def _add_gc(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gc = commands.add_parser("gc", help="list (and with --delete remove) balancers whose Service is gone")
    _add_provider_args(gc)
    gc.add_argument("--delete", action="store_true", help="delete what is found (default: only list)")
    gc.set_defaults(func=_gc)


def _forwarder(args: argparse.Namespace) -> int:
    from lbctl.forwarder.main import ForwarderConfig, check_tools, run, run_cleanup

    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ForwarderConfig(
            node=args.node or "", mode=args.mode, kubeconfig=args.kubeconfig, lb_class=args.lb_class,
            announce_classes=tuple(args.announce_class or [args.lb_class]), interface=args.interface,
            vip_interface=args.vip_interface, pod_networks=tuple(args.pod_cidr), lease_duration_s=args.lease_duration,
            renew_interval_s=args.renew_interval, resync_interval_s=args.resync_interval,
            nft_command=tuple(args.nft.split()), peer_port=args.peer_port,
            heartbeat_interval_s=args.heartbeat_interval, dead_after_s=args.dead_after,
            restart_grace_s=args.restart_grace, status_port=args.status_port, metrics_port=args.metrics_port,
            peer_secret_file=args.peer_secret_file, lan_probes=tuple(args.lan_probe or _env_list("LAN_PROBE")),
        )
    except ValueError as exc:
        print(f"lbctl forwarder: {exc}", file=sys.stderr)
        return 2
    if args.cleanup:
        return run_cleanup(config)
    problem = check_tools(config)
    if problem:
        print(f"lbctl forwarder: {problem}", file=sys.stderr)
        return 1
    return run(config)


def _add_forwarder(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fw = commands.add_parser("forwarder", help="run the node-side forwarder (one per node, hostNetwork)")
    fw.add_argument("--node", default=_env("NODE", os.environ.get("NODE_NAME")),
                    help="this node's name (LBCTL_NODE or NODE_NAME)")
    fw.add_argument("--mode", choices=("announce", "full"), default=_env("MODE", "full"),
                    help="announce: only own VIPs (kube-proxy present); full: also DNAT LB IPs and NodePorts")
    fw.add_argument("--interface", default=_env("INTERFACE"),
                    help="uplink for gratuitous ARP (default: the interface whose subnet holds the VIP)")
    fw.add_argument("--vip-interface", default=_env("VIP_INTERFACE"),
                    help="where VIPs go (default: dummy lbctl0 if the kernel has it, else lo)")
    fw.add_argument("--kubeconfig", default=_env("KUBECONFIG"), help="default $KUBECONFIG, then in-cluster")
    fw.add_argument("--class", dest="lb_class", default=_env("CLASS", LOCAL_CLASS),
                    help="spec.loadBalancerClass handled (LBCTL_CLASS)")
    fw.add_argument("--announce-class", action="append", default=[],
                    help="classes whose VIPs are announced (repeatable; default: --class)")
    fw.add_argument("--pod-cidr", action="append", default=[], metavar="CIDR",
                    help="endpoints must lie in these (repeatable; default: any unicast address)")
    fw.add_argument("--peer-port", type=int, default=_env("PEER_PORT", "7475"),
                    help="UDP port the forwarders exchange heartbeats on (node network)")
    fw.add_argument("--heartbeat-interval", type=float, default=_env("HEARTBEAT_INTERVAL", "0.2"),
                    help="seconds between heartbeats to each peer")
    fw.add_argument("--dead-after", type=float, default=_env("DEAD_AFTER", "1.0"),
                    help="seconds a peer may neither heartbeat nor answer ping before its VIPs move")
    fw.add_argument("--restart-grace", type=float, default=_env("RESTART_GRACE", "15"),
                    help="seconds a peer whose kernel answers ping keeps its VIPs while its forwarder is away")
    fw.add_argument("--lan-probe", action="append", default=[], metavar="IPV4",
                    help="a LAN address (not a node) that answers ping, asked when no peer answers to tell 'this "
                         "node is cut off' from 'the peers are gone' (repeatable; LBCTL_LAN_PROBE, comma-separated; "
                         "default: the IPv4 default gateway)")
    fw.add_argument("--peer-secret-file", default=_env("PEER_SECRET_FILE"),
                    help="a file holding a key shared by every forwarder: heartbeats are signed with it "
                         "(HMAC-SHA256) and unsigned ones ignored")
    fw.add_argument("--status-port", type=int, default=_env("STATUS_PORT", "0"),
                    help="serve /healthz on this port (0: off)")
    fw.add_argument("--metrics-port", type=int, default=_env("METRICS_PORT", "0"),
                    help="serve Prometheus /metrics on this port (0: off)")
    fw.add_argument("--lease-duration", type=int, default=_env("LEASE_DURATION", "40"),
                    help="leaseDurationSeconds of the node's Lease (a record for tools, not VIP liveness)")
    fw.add_argument("--renew-interval", type=float, default=_env("RENEW_INTERVAL", "15"),
                    help="seconds between renewals of the node's Lease")
    fw.add_argument("--cleanup", action="store_true",
                    help="remove this node's table, VIPs and Lease, then exit (the node stops running a forwarder)")
    fw.add_argument("--resync-interval", type=float, default=_env("RESYNC_INTERVAL", "300"),
                    help="seconds between full rewrites of the nftables table")
    fw.add_argument("--nft", default=_env("NFT", "nft"), help="the nft command")
    fw.add_argument("--log-level", default=_env("LOG_LEVEL", "info"), help="debug, info, warning")
    fw.set_defaults(func=_forwarder)


def _demo(args: argparse.Namespace) -> int:
    from lbctl.demo import run_demo

    return run_demo(keep_seconds=args.keep, bgp=args.bgp)


def _add_demo(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser("demo", help="a whole cluster in network namespaces: operator, two forwarders, a "
                               "Service; fetches a page through its VIP, then removes everything (root)")
    demo.add_argument("--keep", type=float, default=0.0, help="seconds to leave it running before tearing down")
    demo.add_argument("--bgp", action="store_true",
                      help="advertise the pool by BGP to an FRR router (with ECMP) in front of the nodes")
    demo.set_defaults(func=_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lbctl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    _add_operator(commands)
    _add_gc(commands)
    _add_forwarder(commands)
    _add_demo(commands)
    report_cli.add_commands(commands)

    dev = commands.add_parser("dev", help="embedded Kubernetes control plane for trying and testing lbctl")
    dev_commands = dev.add_subparsers(dest="dev_command", required=True)
    dir_help = f"state directory (default {controlplane.DEFAULT_DIR})"
    up = dev_commands.add_parser("up", help="build if needed, start etcd + kube-apiserver + kube-controller-manager")
    up.add_argument("--dir", default=str(controlplane.DEFAULT_DIR), help=dir_help)
    up.add_argument("--apiserver-port", type=int, default=None, help="fixed apiserver port (default: a free one)")
    up.add_argument("--extra-address", action="append", default=[], metavar="IP",
                    help="also serve on this address (put in the certificate; a kubeconfig-IP is written)")
    up.add_argument("--timeout", type=float, default=90.0, help="seconds each component may take to be ready")
    up.set_defaults(func=_dev_up)
    down = dev_commands.add_parser("down", help="stop exactly what `up` started")
    down.add_argument("--dir", default=str(controlplane.DEFAULT_DIR), help=dir_help)
    down.set_defaults(func=_dev_down)
    env = dev_commands.add_parser("env", help="print `export KUBECONFIG=…` for a running control plane")
    env.add_argument("--dir", default=str(controlplane.DEFAULT_DIR), help=dir_help)
    env.set_defaults(func=_dev_env)
    build = dev_commands.add_parser("build", help="build the control-plane binaries into the cache")
    build.add_argument("--force", action="store_true", help="rebuild even when cached")
    build.set_defaults(func=_dev_build)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (controlplane.ControlPlaneError, gobuild.BuildError) as exc:
        print(f"lbctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
