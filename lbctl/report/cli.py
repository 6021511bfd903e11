"""`lbctl status` and `lbctl doctor` on the command line: arguments, the reads, the output, and a
one-line message with a non-zero exit for every failure (never a traceback)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any, TextIO

from lbctl.report import facts

# The checks, the status story and the renderers are imported by the commands that use them: every
# lbctl process (the forwarder on each node too) builds this parser.


def _colour(stream: TextIO, choice: str) -> bool:
    if choice != "auto":
        return choice == "always"
    return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def _current_namespace(kubeconfig: str | None) -> str:
    try:
        from kubernetes import config as k8s_config

        _contexts, current = k8s_config.list_kube_config_contexts(config_file=kubeconfig)
        return str((current or {}).get("context", {}).get("namespace") or "default")
    except Exception:
        return "default"


def _not_ours(service: dict[str, Any], classes: tuple[str, ...]) -> str | None:
    if facts.is_lbctls(service, classes):
        return None
    spec = service.get("spec") or {}
    kind = spec.get("type", "ClusterIP")
    cls = spec.get("loadBalancerClass")
    why = f"type {kind}" if kind != "LoadBalancer" else (f"class {cls}" if cls else "no loadBalancerClass and no "
                                                         "lbctl mark (no lbctl operator with --default-class took it)")
    return (f"Service {facts.key_of(service)} is not lbctl's ({why}); lbctl handles type LoadBalancer Services of "
            "class lbctl.io/<provider> (or, with --default-class, class-less ones); pass --class for another class")


async def _status(args: argparse.Namespace) -> int:
    from lbctl.report import gather, render
    from lbctl.report import status as status_report

    client = gather.connect(args.kubeconfig)
    reader = gather.Reader(client, args.request_timeout)
    classes = tuple(args.lb_class)
    colour = _colour(sys.stdout, args.color)
    try:
        if args.service:
            namespace, _, name = args.service.rpartition("/")
            namespace = namespace or args.namespace or _current_namespace(args.kubeconfig)
            story = await gather.service_story(reader, namespace, name)
            problem = _not_ours(story["service"], classes)
            if problem:
                raise gather.ReadError(problem)
            probes = None
            if args.probe:
                probes = await gather.probe_forwarders(story["nodes"], args.probe_port, f"{namespace}/{name}")
            result = status_report.detail(story["service"], story["pools"], story["events"], story["nodes"],
                                          story["leases"], story["slices"], time.time(), probes)
            print(render.dump(result.to_dict(), args.output) if args.output else render.detail_text(result, colour))
            _notes(reader)
            return 0
        namespace = None if args.all_namespaces or not args.namespace else args.namespace
        services, pools, events = await gather.status_table(reader, namespace)
        rows = status_report.rows(services, pools, events, time.time(), classes)
        if args.output:
            print(render.dump([r.to_dict() for r in rows], args.output))
        elif rows:
            print(render.status_table(rows, all_namespaces=namespace is None, colour=colour))
        else:
            where = f"namespace {namespace}" if namespace else "any namespace"
            print(f"no lbctl Services in {where}", file=sys.stderr)
        _notes(reader)
        return 0
    finally:
        await client.close()


def _notes(reader: Any) -> None:
    for note in reader.notes:
        print(f"lbctl status: note: {note}", file=sys.stderr)


async def _doctor(args: argparse.Namespace) -> int:
    from lbctl.report import doctor as doctor_checks
    from lbctl.report import gather, render

    client = gather.connect(args.kubeconfig)
    reader = gather.Reader(client, args.request_timeout)
    try:
        snapshot = await gather.doctor_snapshot(reader, check_access=args.rbac)
    finally:
        await client.close()
    if args.provider in ("aws", "gce"):
        from lbctl.report.cloud import provider_checks

        snapshot.extra = await provider_checks(args.provider, args.cluster_name, dict(args.provider_option))
    snapshot.classes = tuple(args.lb_class)
    checks = doctor_checks.run_checks(snapshot)
    if args.output:
        print(render.dump([c.to_dict() for c in checks], args.output))
    else:
        print(render.checks_text(checks, _colour(sys.stdout, args.color)))
    return 1 if doctor_checks.failed(checks) else 0


def _run(command: str, work: Any, args: argparse.Namespace) -> int:
    from lbctl.report import gather  # the kube client: imported only by the commands that read the cluster

    try:
        return int(asyncio.run(work(args)))
    except gather.ReadError as exc:
        print(f"lbctl {command}: {exc}", file=sys.stderr)
        return 1


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), help="default $KUBECONFIG, "
                        "then ~/.kube/config, then in-cluster")
    parser.add_argument("-o", "--output", choices=("json", "yaml"), help="machine-readable output")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colour the state (auto: only on a terminal, and not with NO_COLOR)")
    parser.add_argument("--request-timeout", type=float, default=10.0, help="seconds per API request")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = commands.add_parser("status", help="lbctl's Services: addresses, who serves them, and why any is not "
                                 "ready (with a name: the full story)")
    status.add_argument("service", nargs="?", help="one Service (NAME or NAMESPACE/NAME): everything about it")
    status.add_argument("-n", "--namespace", help="only this namespace (default: every namespace)")
    status.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace (the default)")
    status.add_argument("--class", dest="lb_class", action="append", default=[],
                        help="also count this loadBalancerClass as lbctl's (repeatable; lbctl.io/* always are)")
    status.add_argument("--probe", action="store_true",
                        help="with a Service: also ask each node's forwarder /healthz (needs a route to the nodes)")
    status.add_argument("--probe-port", type=int, default=7476, help="the forwarders' --status-port")
    _common(status)
    status.set_defaults(func=lambda args: _run("status", _status, args))

    doctor = commands.add_parser("doctor", help="check the installation; exits 1 when a check fails")
    doctor.add_argument("--provider", choices=("local", "aws", "gce"), default=os.environ.get("LBCTL_PROVIDER"),
                        help="also check this cloud's credentials, tags and subnets (read-only calls)")
    doctor.add_argument("--cluster-name", default=os.environ.get("LBCTL_CLUSTER_NAME", "kubernetes"))
    doctor.add_argument("--provider-option", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="region, endpoint_url, project, network … as for the operator")
    doctor.add_argument("--class", dest="lb_class", action="append", default=[],
                        help="also check Services of this loadBalancerClass (the operator's --class when it is not "
                        "lbctl.io/*; repeatable)")
    doctor.add_argument("--rbac", action=argparse.BooleanOptionalAction, default=True,
                        help="check the operator's and forwarder's RBAC with SubjectAccessReviews")
    _common(doctor)
    doctor.set_defaults(func=lambda args: _run("doctor", _doctor, args))
