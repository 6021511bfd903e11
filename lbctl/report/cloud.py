"""`lbctl doctor --provider aws|gce`: read-only calls that show the credentials work and the cloud
holds what the provider needs (I/O; each outcome is a doctor Check)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from lbctl.report.doctor import FAIL, PASS, WARN, Check
from providers import aws_plan, registry
from providers import tags as cloud_tags
from providers.base import ProviderSettings


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


async def provider_checks(provider: str, cluster_name: str, options: Mapping[str, str]) -> list[Check]:
    name = f"{provider}-credentials"
    try:
        adapter = registry.load(provider, ProviderSettings(cluster_name, options))
    except Exception as exc:
        return [Check(name, FAIL, f"the {provider} provider cannot start: {_one_line(exc)}",
                      "give it the options and credentials the operator has (see README, Using it)")]
    checks = []
    try:
        try:
            owned = await asyncio.wait_for(adapter.list_owned(), timeout=60)
        except Exception as exc:
            return [Check(name, FAIL, f"listing this cluster's balancers failed: {_one_line(exc)}",
                          "check the credentials and their permissions (read access to load balancers)")]
        checks.append(Check(name, PASS, f"credentials work: {len(owned)} balancer(s) tagged "
                            f"{cloud_tags.CLUSTER_PREFIX}{cluster_name}"))
        if provider == "aws":
            checks.append(await _aws_subnets(adapter, cluster_name))
        if provider == "gce":
            checks += await _gce_placement(adapter)
    finally:
        await adapter.close()
    return checks


async def _aws_subnets(adapter: Any, cluster_name: str) -> Check:
    """An NLB without the subnets annotation goes into the subnets tagged for the cluster."""
    tag = f"{cloud_tags.CLUSTER_PREFIX}{cluster_name}"
    try:
        answer = await asyncio.to_thread(adapter.ec2.describe_subnets,
                                         Filters=[{"Name": "tag-key", "Values": [tag]}])
    except Exception as exc:
        return Check("aws-subnets", FAIL, f"describing subnets failed: {_one_line(exc)}",
                     "grant ec2:DescribeSubnets")
    subnets = answer.get("Subnets") or []
    roles = {aws_plan.TAG_ROLE_ELB: 0, aws_plan.TAG_ROLE_INTERNAL_ELB: 0}
    for subnet in subnets:
        tags = {t.get("Key"): t.get("Value") for t in subnet.get("Tags") or ()}
        if tags.get(tag) not in ("owned", "shared"):
            continue
        for role in roles:
            if tags.get(role) in ("1", ""):
                roles[role] += 1
    if not any(roles.values()):
        return Check("aws-subnets", WARN, f"no subnet is tagged {tag}=owned|shared and {aws_plan.TAG_ROLE_ELB} "
                     "(or internal-elb): every Service must name its subnets "
                     "(service.beta.kubernetes.io/aws-load-balancer-subnets)",
                     f"tag one subnet per zone {tag}=owned and {aws_plan.TAG_ROLE_ELB}=1")
    return Check("aws-subnets", PASS, f"subnets tagged for the cluster: {roles[aws_plan.TAG_ROLE_ELB]} for "
                 f"internet-facing, {roles[aws_plan.TAG_ROLE_INTERNAL_ELB]} for internal balancers")


GCE_PLACEMENT_FIX = {
    "region": "set the gce region option (gce.region in the chart) to the region of the cluster's nodes",
    "network": "set the gce network option (gce.network) to the VPC network of the cluster's nodes",
    "subnetwork": "set the gce subnetwork option to a subnetwork of that network in the region (internal "
                  "balancers take their addresses from it; an auto-mode network has one named like the network)",
}


async def _gce_placement(adapter: Any) -> list[Check]:
    """The region, network and subnetwork the options name exist (a missing subnetwork fails only
    internal balancers: warn)."""
    try:
        found = await asyncio.wait_for(adapter.placement(), timeout=60)
    except Exception as exc:
        return [Check("gce-placement", FAIL, f"reading the region, network and subnetwork failed: {_one_line(exc)}",
                      "grant compute.regions.get, compute.networks.get and compute.subnetworks.get")]
    checks = []
    for item in found:
        name = f"gce-{item.what}"
        if item.found:
            checks.append(Check(name, PASS, f"{item.what} {item.name} exists"))
        else:
            status = WARN if item.what == "subnetwork" else FAIL
            effect = ": internal balancers cannot be made" if item.what == "subnetwork" else ""
            checks.append(Check(name, status, f"no {item.what} {item.name}{effect}", GCE_PLACEMENT_FIX[item.what]))
    return checks
