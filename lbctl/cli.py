"""The `lbctl` command line: one entry point for the operator, the forwarder and the dev tools."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lbctl.dev import controlplane, gobuild


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lbctl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

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
