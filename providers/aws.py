"""AWS provider: one Network Load Balancer per Service, with instance targets on the node ports.

A thin boto3 adapter: it reads what AWS has, hands it to `providers.aws_plan` (pure) for the
decisions, and writes only what the plan says. Every SDK call goes through a `CloudCaller`
(thread, rate limit, jittered retries on throttling and 5xx). Resources are found by their
deterministic names (the NLB, its target groups and security group) and tags, so `ensure` and
`delete` can be called again after a crash at any point.

Two short-lived memories keep node changes cheap, and losing them only costs reads: instance facts
(`InstanceCache`), and what the last full ensure of each balancer found (`aws_plan.KnownState`), which
lets an ensure that only changes nodes register and deregister targets without reading the NLB again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError

from lbctl.model.errors import CloudRefusalError, InvalidServiceError, LoadBalancerError, TransientProviderError
from lbctl.model.types import LoadBalancerRef, LoadBalancerSpec, LoadBalancerStatus
from providers import aws_plan as plan
from providers.base import Provider, ProviderSettings
from providers.retry import CloudCaller

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ec2.type_defs import (
        FilterTypeDef,
        IpPermissionOutputTypeDef,
        IpPermissionTypeDef,
        IpRangeTypeDef,
        Ipv6RangeTypeDef,
        SecurityGroupTypeDef,
        TagSpecificationTypeDef,
        TagTypeDef,
    )
    from mypy_boto3_elbv2 import ElasticLoadBalancingv2Client
    from mypy_boto3_elbv2.literals import IpAddressTypeType, ProtocolEnumType
    from mypy_boto3_elbv2.type_defs import (
        ActionTypeDef,
        CertificateTypeDef,
        LoadBalancerTypeDef,
        SubnetMappingTypeDef,
        TargetGroupTypeDef,
    )
    from mypy_boto3_elbv2.type_defs import TagTypeDef as ElbTagTypeDef

log = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")

TAGS_PER_DESCRIBE = 20  # DescribeTags takes at most 20 ARNs
FILTER_VALUES = 190  # EC2 filters take at most 200 values


def is_retryable(exc: BaseException) -> bool:
    """CloudCaller's predicate: throttling, 5xx and dropped connections; never other 4xx."""
    if isinstance(exc, ClientError):
        return plan.is_retryable_error(_code(exc), _status(exc))
    return isinstance(exc, ConnectionError | HTTPClientError)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One ensure's reading of AWS, with the desired state built from it."""

    desired: plan.Desired
    observed: plan.Observed
    vpc_id: str
    raw_balancer: LoadBalancerTypeDef | None
    node_security_groups: frozenset[str]


class InstanceCache:
    """Instance facts (state, VPC, security groups) kept for a short while and shared by concurrent
    ensures: after a node change every balancer asks about the same instances at once, and one
    DescribeInstances answers them all. Node changes themselves arrive in the spec, so only these
    slow-moving facts can be stale, for at most `ttl_s`. Instances not found are not remembered."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl_s
        self._clock = clock
        self._known: dict[str, tuple[float, plan.InstanceInfo]] = {}
        self._pending: dict[str, asyncio.Future[list[plan.InstanceInfo]]] = {}

    async def get(
        self, ids: Sequence[str], fetch: Callable[[Sequence[str]], Awaitable[list[plan.InstanceInfo]]]
    ) -> list[plan.InstanceInfo]:
        now = self._clock()
        found = {i: e[1] for i in ids if (e := self._known.get(i)) is not None and now - e[0] < self._ttl}
        waits = {self._pending[i] for i in ids if i not in found and i in self._pending}
        missing = [i for i in ids if i not in found and i not in self._pending]
        if missing:
            lookup = asyncio.ensure_future(fetch(missing))
            self._pending.update(dict.fromkeys(missing, lookup))
            lookup.add_done_callback(lambda done: self._settle(missing, done))
            waits.add(lookup)
        for answer in await asyncio.gather(*waits):
            found.update((info.id, info) for info in answer if info.id in ids)
        return [found[i] for i in ids if i in found]

    def _settle(self, ids: Sequence[str], done: asyncio.Future[list[plan.InstanceInfo]]) -> None:
        for i in ids:
            if self._pending.get(i) is done:
                del self._pending[i]
        if not done.cancelled() and done.exception() is None:
            stamp = self._clock()
            self._known.update((info.id, (stamp, info)) for info in done.result())


class AwsProvider(Provider):
    name = "aws"
    needs_node_ports = True

    def __init__(
        self,
        cluster_name: str,
        elbv2: ElasticLoadBalancingv2Client,
        ec2: EC2Client,
        *,
        elbv2_caller: CloudCaller | None = None,
        elbv2_write_caller: CloudCaller | None = None,
        ec2_caller: CloudCaller | None = None,
        instance_cache_s: float = 30.0,
        state_cache_s: float = 300.0,
    ) -> None:
        self.cluster_name = cluster_name
        self.elbv2 = elbv2
        self.ec2 = ec2
        # Rate limits after AWS's own token buckets: ELB Describe* refill 10/s from 40; ELB writes and
        # EC2 have their own buckets. Going over them only costs throttling retries.
        self._elb = elbv2_caller or CloudCaller(is_retryable, rate_per_s=10.0, burst=40, provider="aws")
        self._elb_write = elbv2_write_caller or elbv2_caller or CloudCaller(is_retryable, rate_per_s=20.0, burst=40,
                                                                            provider="aws")
        self._ec2 = ec2_caller or CloudCaller(is_retryable, rate_per_s=20.0, burst=100, provider="aws")
        self._instance_cache = InstanceCache(instance_cache_s)
        self._state_cache_s = state_cache_s
        self._known: dict[str, plan.KnownState] = {}

    @classmethod
    def create(cls, settings: ProviderSettings) -> AwsProvider:
        # Retries are CloudCaller's job; botocore's own would multiply them.
        config = Config(retries={"mode": "standard", "total_max_attempts": 1}, max_pool_connections=16)
        session = boto3.session.Session(region_name=settings.options.get("region") or None)
        if session.region_name is None:
            raise ValueError("no AWS region: pass the aws provider option region (or set AWS_REGION)")
        endpoint = settings.options.get("endpoint_url") or None  # None: AWS_ENDPOINT_URL / the real AWS
        try:
            state_cache_s = float(settings.options.get("state_cache_s", "300"))
        except ValueError:
            raise ValueError("the aws provider option state_cache_s must be a number of seconds") from None
        elbv2 = session.client("elbv2", endpoint_url=endpoint, config=config)
        ec2 = session.client("ec2", endpoint_url=endpoint, config=config)
        return cls(settings.cluster_name, elbv2, ec2, state_cache_s=state_cache_s)

    async def close(self) -> None:
        self.elbv2.close()
        self.ec2.close()

    # ── calling AWS ─────────────────────────────────────────────────────────────────────────────

    async def _run(self, caller: CloudCaller, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if caller is self._elb and not getattr(fn, "__name__", "").startswith("describe_"):
            caller = self._elb_write  # ELB writes draw on their own AWS token bucket
        try:
            return await caller.call(fn, *args, **kwargs)
        except ClientError as exc:
            raise self._translate(exc) from exc
        except BotoCoreError as exc:
            raise TransientProviderError(f"AWS call failed: {exc}", fix="lbctl retries; check network access to AWS") \
                from exc

    async def _run_or_none(
        self, caller: CloudCaller, absent: tuple[str, ...], fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs
    ) -> T | None:
        """Like _run, but None when AWS answers with one of the `absent` codes (already gone, etc.)."""
        try:
            return await self._run(caller, fn, *args, **kwargs)
        except LoadBalancerError as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and _code(cause) in absent:
                return None
            raise

    def _translate(self, exc: ClientError) -> LoadBalancerError:
        code = _code(exc)
        message = str(exc.response.get("Error", {}).get("Message", ""))
        what = f"AWS {exc.operation_name}: {code}: {message}"
        if code == "CertificateNotFound":
            return InvalidServiceError(what, field=f"metadata.annotations[{plan.ANN_SSL_CERT}]",
                                       fix="give the ARN of an existing certificate in this region")
        if code.startswith("InvalidAllocationID"):
            return InvalidServiceError(what, field=f"metadata.annotations[{plan.ANN_EIP_ALLOCATIONS}]",
                                       fix="list Elastic IP allocations that exist in this region")
        kind = plan.classify_error(code, _status(exc))
        fix = {
            "retry": "lbctl retries with backoff",
            "quota": "raise the AWS quota or remove unused balancers; lbctl retries",
        }.get(kind, "lbctl retries; check the AWS error")
        return CloudRefusalError(what, fix=fix) if kind == "quota" else TransientProviderError(what, fix=fix)

    # ── the Provider interface ──────────────────────────────────────────────────────────────────

    async def ensure(self, spec: LoadBalancerSpec) -> LoadBalancerStatus:
        intent = plan.read_service(spec)  # every Service-side check, before any call
        known = self._known.pop(intent.name, None)  # kept again only once this ensure succeeds
        if known is not None:
            usable = plan.usable_instances(intent, await self._instances(intent.instance_ids))
            only_targets = plan.target_changes(known, intent, usable, time.monotonic(), self._state_cache_s)
            if only_targets is not None:
                try:
                    await self._change_targets(known.target_group_arns, *only_targets)
                except TransientProviderError:
                    log.info("NLB %s: targets-only update failed; ensuring it in full", intent.name)
                else:
                    self._known[intent.name] = dataclasses.replace(known, targets=frozenset(i.id for i in usable))
                    return known.status

        snapshot = await self._observe(spec.cluster_name, intent)
        desired, observed = snapshot.desired, snapshot.observed
        if snapshot.raw_balancer is not None:
            plan.check_owner(desired.tags, observed.balancer.tags if observed.balancer else {}, intent.name)
        changes = plan.plan_changes(desired, observed)
        if changes.create_balancer and desired.eip_allocations:
            await self._check_allocations(desired.eip_allocations)
        if changes.empty:
            assert observed.balancer is not None
            dns_name, group_arns = observed.balancer.dns_name, {tg.name: tg.arn for tg in observed.target_groups}
        else:
            dns_name, group_arns = await self._apply(desired, observed, changes, snapshot.vpc_id)
        status = plan.status_of(dns_name, intent.ports)
        self._known[intent.name] = plan.KnownState(
            intent=plan.without_nodes(intent), vpc_id=snapshot.vpc_id,
            node_security_groups=snapshot.node_security_groups,
            target_group_arns=tuple(group_arns[tg.name] for tg in desired.target_groups),
            targets=desired.targets, status=status, stamp=time.monotonic(),
        )
        return status

    async def _change_targets(
        self, group_arns: Sequence[str], register: Sequence[str], deregister: Sequence[str]
    ) -> None:
        await asyncio.gather(
            *(self._run(self._elb, self.elbv2.register_targets, TargetGroupArn=arn,
                        Targets=[{"Id": i} for i in register]) for arn in group_arns if register),
            *(self._run_or_none(self._elb, ("InvalidTarget",), self.elbv2.deregister_targets, TargetGroupArn=arn,
                                Targets=[{"Id": i} for i in deregister]) for arn in group_arns if deregister),
        )

    async def delete(self, ref: LoadBalancerRef) -> None:
        self._known.pop(ref.name, None)
        raw = await self._find_balancer(ref.name)
        attached: set[str] = set()
        if raw is not None:
            arn = raw["LoadBalancerArn"]
            tags = (await self._tags([arn])).get(arn, {})
            if plan.ref_from_tags(ref.name, self.cluster_name, tags) is None:
                log.warning("not deleting NLB %s: it is not tagged as this cluster's", ref.name)
                raw = None
            else:
                for listener in await self._listeners(arn):
                    attached.update(a for a in [_forward_arn(listener.get("DefaultActions", []))] if a)
                    await self._run_or_none(self._elb, ("ListenerNotFound",), self.elbv2.delete_listener,
                                            ListenerArn=listener["ListenerArn"])
        for tg_arn in await self._own_target_groups(ref.name, attached):
            await self._run_or_none(
                self._elb, ("TargetGroupNotFound",), self.elbv2.delete_target_group, TargetGroupArn=tg_arn,
            )
        if raw is not None:
            await self._run_or_none(
                self._elb, ("LoadBalancerNotFound",), self.elbv2.delete_load_balancer,
                LoadBalancerArn=raw["LoadBalancerArn"],
            )
        # The NLB's own security group (its rules go with it). The cluster's shared backend group and
        # the node rule admitting it stay: other balancers use them.
        for group in await self._groups([
            {"Name": "group-name", "Values": [plan.frontend_group_name(ref.name)]},
            {"Name": f"tag:{plan.TAG_BALANCER}", "Values": [ref.name]},
            {"Name": f"tag:{plan.TAG_CLUSTER_PREFIX}{self.cluster_name}", "Values": ["owned"]},
        ]):
            # DependencyViolation while AWS still releases the NLB's interfaces: a TransientProviderError,
            # and the operator calls delete again.
            await self._run_or_none(self._ec2, ("InvalidGroup.NotFound",), self.ec2.delete_security_group,
                                    GroupId=group["GroupId"])

    async def get(self, ref: LoadBalancerRef) -> LoadBalancerStatus | None:
        raw = await self._find_balancer(ref.name)
        if raw is None:
            return None
        listeners = await self._listeners(raw["LoadBalancerArn"])
        ports = plan.ports_of_listeners((int(li["Port"]), str(li["Protocol"])) for li in listeners)
        return plan.status_of(raw["DNSName"], ports)

    async def list_owned(self) -> list[LoadBalancerRef]:
        balancers: list[LoadBalancerTypeDef] = []
        marker: str | None = None
        while True:
            page = await self._run(self._elb, self.elbv2.describe_load_balancers, **_marker(marker), PageSize=400)
            balancers += [b for b in page.get("LoadBalancers", []) if b.get("Type") == "network"]
            marker = page.get("NextMarker")
            if not marker:
                break
        tags = await self._tags([b["LoadBalancerArn"] for b in balancers])
        refs = [
            plan.ref_from_tags(b["LoadBalancerName"], self.cluster_name, tags.get(b["LoadBalancerArn"], {}))
            for b in balancers
        ]
        return [r for r in refs if r is not None]

    # ── observing ───────────────────────────────────────────────────────────────────────────────

    async def _observe(self, cluster_name: str, intent: plan.ServiceIntent) -> Snapshot:
        instances, raw = await asyncio.gather(self._instances(intent.instance_ids), self._find_balancer(intent.name))
        usable = plan.usable_instances(intent, instances)
        vpc_id = usable[0].vpc_id
        frontend_name, backend_name = plan.frontend_group_name(intent.name), plan.backend_group_name(cluster_name)
        candidates = sorted({g for i in usable for g in i.security_groups})
        subnets, node_groups, own_groups, (balancer, listeners, groups) = await asyncio.gather(
            self._subnets(vpc_id),
            self._groups([], group_ids=candidates) if candidates else _no_groups(),
            self._groups([{"Name": "vpc-id", "Values": [vpc_id]},
                          {"Name": "group-name", "Values": [frontend_name, backend_name]}]),
            self._observe_balancer(intent, raw),
        )
        group_tags = {g["GroupId"]: _tag_dict(g.get("Tags", [])) for g in node_groups}
        group_ids = plan.choose_node_groups(usable, group_tags, cluster_name, intent.node_of_instance)
        chosen = plan.choose_subnets(intent, cluster_name, subnets)
        desired = plan.build_desired(intent, chosen, usable, group_ids)

        by_name = {g.get("GroupName"): g for g in own_groups}
        frontend, backend = by_name.get(frontend_name), by_name.get(backend_name)
        backend_id = backend["GroupId"] if backend else None
        open_groups = frozenset(
            g["GroupId"] for g in node_groups
            if backend_id and any(_admits_group(p, backend_id) for p in g.get("IpPermissions", []))
        )
        observed = plan.Observed(
            balancer, listeners, groups,
            frontend_group=frontend["GroupId"] if frontend else None,
            frontend_rules=frozenset(r for p in (frontend or {}).get("IpPermissions", []) for r in _rules_of(p)),
            backend_group=backend_id, node_groups_open=open_groups,
        )
        return Snapshot(desired, observed, vpc_id, raw, frozenset(candidates))

    async def _observe_balancer(
        self, intent: plan.ServiceIntent, raw: LoadBalancerTypeDef | None
    ) -> tuple[plan.ObservedBalancer | None, tuple[plan.ObservedListener, ...], tuple[plan.ObservedTargetGroup, ...]]:
        listeners: tuple[plan.ObservedListener, ...] = ()
        balancer: plan.ObservedBalancer | None = None
        attached: list[str] = []
        if raw is not None:
            arn = raw["LoadBalancerArn"]
            raw_listeners, attributes = await asyncio.gather(
                self._listeners(arn),
                self._run(self._elb, self.elbv2.describe_load_balancer_attributes, LoadBalancerArn=arn),
            )
            listeners = tuple(_observed_listener(li) for li in raw_listeners)
            attached = sorted({li.target_group_arn for li in listeners if li.target_group_arn})
            cross_zone = any(
                a.get("Key") == "load_balancing.cross_zone.enabled" and a.get("Value") == "true"
                for a in attributes.get("Attributes", [])
            )
            balancer = plan.ObservedBalancer(
                arn=arn, scheme=raw.get("Scheme", ""), dns_name=raw.get("DNSName", ""),
                subnet_ids=frozenset(z["SubnetId"] for z in raw.get("AvailabilityZones", []) if "SubnetId" in z),
                tags={}, cross_zone=cross_zone, security_groups=frozenset(raw.get("SecurityGroups", [])),
                ip_address_type=str(raw.get("IpAddressType") or plan.IPV4),
            )
        raw_groups: list[TargetGroupTypeDef] = []
        if attached:
            page = await self._run(self._elb, self.elbv2.describe_target_groups, TargetGroupArns=attached)
            raw_groups += page.get("TargetGroups", [])
        # Groups of this NLB that no listener uses yet (a crash between creating them and the listener).
        known = {g["TargetGroupName"] for g in raw_groups}
        missing = [tg.name for tg in intent.target_groups if tg.name not in known]
        for found in await asyncio.gather(*(self._target_group_named(name) for name in missing)):
            raw_groups += [found] if found is not None else []
        arns = [g["TargetGroupArn"] for g in raw_groups]
        tags = await self._tags(([balancer.arn] if balancer else []) + arns)
        wanted = {tg.name for tg in intent.target_groups}
        health = await asyncio.gather(*(
            self._registered(g["TargetGroupArn"]) if g["TargetGroupName"] in wanted else _nothing()
            for g in raw_groups
        ))
        groups = tuple(
            _observed_group(g, tags.get(g["TargetGroupArn"], {}), targets)
            for g, targets in zip(raw_groups, health, strict=True)
        )
        if balancer is not None:
            balancer = dataclasses.replace(balancer, tags=tags.get(balancer.arn, {}))
        return balancer, listeners, groups

    async def _find_balancer(self, name: str) -> LoadBalancerTypeDef | None:
        page = await self._run_or_none(
            self._elb, ("LoadBalancerNotFound",), self.elbv2.describe_load_balancers, Names=[name],
        )
        found = [b for b in (page["LoadBalancers"] if page else []) if b.get("LoadBalancerName") == name]
        return found[0] if found else None

    async def _listeners(self, arn: str) -> list[Any]:
        result: list[Any] = []
        marker: str | None = None
        while True:
            page = await self._run(self._elb, self.elbv2.describe_listeners, LoadBalancerArn=arn, **_marker(marker))
            result += page.get("Listeners", [])
            marker = page.get("NextMarker")
            if not marker:
                return result

    async def _target_group_named(self, name: str) -> TargetGroupTypeDef | None:
        page = await self._run_or_none(
            self._elb, ("TargetGroupNotFound",), self.elbv2.describe_target_groups, Names=[name],
        )
        found = [g for g in (page["TargetGroups"] if page else []) if g.get("TargetGroupName") == name]
        return found[0] if found else None

    async def _registered(self, tg_arn: str) -> frozenset[str]:
        page = await self._run(self._elb, self.elbv2.describe_target_health, TargetGroupArn=tg_arn)
        return frozenset(
            d["Target"]["Id"] for d in page.get("TargetHealthDescriptions", [])
            if d.get("TargetHealth", {}).get("State") != "draining"
        )

    async def _tags(self, arns: Sequence[str]) -> dict[str, dict[str, str]]:
        result: dict[str, dict[str, str]] = {}
        for chunk in _chunks(arns, TAGS_PER_DESCRIBE):
            page = await self._run(self._elb, self.elbv2.describe_tags, ResourceArns=list(chunk))
            for description in page.get("TagDescriptions", []):
                result[description["ResourceArn"]] = {
                    t["Key"]: t.get("Value", "") for t in description.get("Tags", [])
                }
        return result

    async def _own_target_groups(self, name: str, attached: Iterable[str]) -> list[str]:
        """ARNs of every target group tagged as this NLB's: the attached ones and, found by name
        shape over the whole account, any a crash left behind."""
        candidates = set(attached)
        marker: str | None = None
        while True:
            page = await self._run(self._elb, self.elbv2.describe_target_groups, **_marker(marker), PageSize=400)
            candidates.update(
                g["TargetGroupArn"] for g in page.get("TargetGroups", [])
                if plan.is_target_group_of(name, g["TargetGroupName"])
            )
            marker = page.get("NextMarker")
            if not marker:
                break
        tags = await self._tags(sorted(candidates))
        cluster_tag = plan.TAG_CLUSTER_PREFIX + self.cluster_name
        return sorted(
            arn for arn, t in tags.items() if t.get(plan.TAG_BALANCER) == name and t.get(cluster_tag) == "owned"
        )

    async def _instances(self, instance_ids: Sequence[str]) -> list[plan.InstanceInfo]:
        return await self._instance_cache.get(instance_ids, self._describe_instances)

    async def _describe_instances(self, instance_ids: Sequence[str]) -> list[plan.InstanceInfo]:
        result: list[plan.InstanceInfo] = []
        for chunk in _chunks(instance_ids, FILTER_VALUES):
            token: str | None = None
            while True:
                page = await self._run(self._ec2, self.ec2.describe_instances,
                                       Filters=[{"Name": "instance-id", "Values": list(chunk)}], **_token(token))
                for reservation in page.get("Reservations", []):
                    for i in reservation.get("Instances", []):
                        result.append(plan.InstanceInfo(
                            id=i["InstanceId"], state=i.get("State", {}).get("Name", "unknown"),
                            vpc_id=i.get("VpcId", ""),
                            security_groups=tuple(g["GroupId"] for g in i.get("SecurityGroups", []) if "GroupId" in g),
                        ))
                token = page.get("NextToken")
                if not token:
                    break
        return result

    async def _subnets(self, vpc_id: str) -> list[plan.SubnetInfo]:
        result: list[plan.SubnetInfo] = []
        token: str | None = None
        while True:
            page = await self._run(self._ec2, self.ec2.describe_subnets,
                                   Filters=[{"Name": "vpc-id", "Values": [vpc_id]}], **_token(token))
            result += [
                plan.SubnetInfo(
                    id=s["SubnetId"], zone=s.get("AvailabilityZone", ""), vpc_id=s.get("VpcId", ""),
                    cidr=s.get("CidrBlock", ""), tags={t["Key"]: t.get("Value", "") for t in s.get("Tags", [])},
                    ipv6_cidrs=tuple(
                        a["Ipv6CidrBlock"] for a in s.get("Ipv6CidrBlockAssociationSet", [])
                        if a.get("Ipv6CidrBlock") and _ipv6_block_usable(a.get("Ipv6CidrBlockState", {}))
                    ),
                )
                for s in page.get("Subnets", [])
            ]
            token = page.get("NextToken")
            if not token:
                return result

    async def _groups(
        self, filters: Sequence[FilterTypeDef], group_ids: Sequence[str] = ()
    ) -> list[SecurityGroupTypeDef]:
        result: list[SecurityGroupTypeDef] = []
        token: str | None = None
        by_id: dict[str, Any] = {"GroupIds": list(group_ids)} if group_ids else {}
        while True:
            page = await self._run(self._ec2, self.ec2.describe_security_groups, Filters=list(filters),
                                   **by_id, **_token(token))
            result += page.get("SecurityGroups", [])
            token = page.get("NextToken")
            if not token:
                return result

    async def _check_allocations(self, allocations: Sequence[str]) -> None:
        """Elastic IPs are only taken when the NLB is created: check they exist before any write."""
        page = await self._run(self._ec2, self.ec2.describe_addresses, AllocationIds=list(allocations))
        found = {a.get("AllocationId") for a in page.get("Addresses", [])}
        if missing := [a for a in allocations if a not in found]:
            raise InvalidServiceError(
                f"Elastic IP allocations not found: {', '.join(missing)}",
                field=f"metadata.annotations[{plan.ANN_EIP_ALLOCATIONS}]", fix="list existing allocation ids",
            )

    # ── converging ──────────────────────────────────────────────────────────────────────────────

    async def _apply(
        self, desired: plan.Desired, observed: plan.Observed, changes: plan.Changes, vpc_id: str
    ) -> tuple[str, dict[str, str]]:
        """Write what `changes` says; returns the NLB's DNS name and the target groups' ARNs by name."""
        balancer = observed.balancer
        arn, dns_name = (balancer.arn, balancer.dns_name) if balancer else ("", "")
        if changes.delete_balancer:
            log.info("NLB %s changes scheme to %s: replacing it", desired.name, desired.scheme)
            await self._run_or_none(self._elb, ("LoadBalancerNotFound",), self.elbv2.delete_load_balancer,
                                    LoadBalancerArn=changes.delete_balancer)
        frontend, backend = await asyncio.gather(
            self._security_group(plan.frontend_group_name(desired.name), observed.frontend_group, vpc_id,
                                 f"lbctl: clients of NLB {desired.name}", desired.tags),
            self._security_group(plan.backend_group_name(self.cluster_name), observed.backend_group, vpc_id,
                                 "lbctl: every NLB of the cluster; node security groups admit it",
                                 self._backend_tags()),
        )
        await self._authorize_frontend(frontend, changes.authorize_frontend, desired.tags, desired.name)
        await self._open_node_groups(changes.open_node_groups, backend)
        if changes.create_balancer:
            arn, dns_name = await self._create_balancer(desired, [frontend, backend])
        if changes.set_security_groups:
            await self._run(self._elb, self.elbv2.set_security_groups, LoadBalancerArn=arn,
                            SecurityGroups=[frontend, backend])
        if changes.set_ip_address_type == plan.IPV4:  # before the subnets: they may lack IPv6
            await self._set_ip_address_type(arn, changes.set_ip_address_type)
        if changes.set_subnets is not None:
            await self._run(self._elb, self.elbv2.set_subnets, LoadBalancerArn=arn, Subnets=list(changes.set_subnets))
        if changes.set_ip_address_type == plan.DUALSTACK:  # after the subnets: all of them have IPv6 now
            await self._set_ip_address_type(arn, changes.set_ip_address_type)
        if changes.set_cross_zone is not None:
            value = "true" if changes.set_cross_zone else "false"
            await self._run(self._elb, self.elbv2.modify_load_balancer_attributes, LoadBalancerArn=arn,
                            Attributes=[{"Key": "load_balancing.cross_zone.enabled", "Value": value}])
        if changes.balancer_tags:
            await self._run(self._elb, self.elbv2.add_tags, ResourceArns=[arn], Tags=_elb_tags(changes.balancer_tags))

        group_arns = {tg.name: tg.arn for tg in observed.target_groups}
        created = await asyncio.gather(*(self._create_target_group(tg, desired, vpc_id)
                                         for tg in changes.create_target_groups))
        group_arns.update(zip((tg.name for tg in changes.create_target_groups), created, strict=True))
        for tg_arn, tg in changes.modify_health:
            await self._run(self._elb, self.elbv2.modify_target_group, TargetGroupArn=tg_arn, **_health_args(tg.health))
        for tg_arn, tags in changes.target_group_tags:
            await self._run(self._elb, self.elbv2.add_tags, ResourceArns=[tg_arn], Tags=_elb_tags(tags))
        await asyncio.gather(
            *(self._run(self._elb, self.elbv2.register_targets, TargetGroupArn=group_arns[name],
                        Targets=[{"Id": i} for i in ids]) for name, ids in changes.register),
            *(self._run_or_none(self._elb, ("InvalidTarget",), self.elbv2.deregister_targets, TargetGroupArn=tg_arn,
                                Targets=[{"Id": i} for i in ids]) for tg_arn, ids in changes.deregister),
        )

        for listener_arn in changes.delete_listeners:
            await self._run_or_none(self._elb, ("ListenerNotFound",), self.elbv2.delete_listener,
                                    ListenerArn=listener_arn)
        for listener in changes.create_listeners:
            await self._run(self._elb, self.elbv2.create_listener, LoadBalancerArn=arn, Port=listener.port,
                            Protocol=cast("ProtocolEnumType", listener.protocol),
                            DefaultActions=_forward(group_arns[listener.target_group]), Tags=_elb_tags(desired.tags),
                            Certificates=_certificates(listener))
        for listener_arn, listener in changes.modify_listeners:
            await self._run(self._elb, self.elbv2.modify_listener, ListenerArn=listener_arn,
                            DefaultActions=_forward(group_arns[listener.target_group]),
                            Certificates=_certificates(listener))
        for tg_arn in changes.delete_target_groups:
            await self._run_or_none(self._elb, ("TargetGroupNotFound",), self.elbv2.delete_target_group,
                                    TargetGroupArn=tg_arn)
        if changes.revoke_frontend:
            await self._run_or_none(self._ec2, ("InvalidPermission.NotFound",), self.ec2.revoke_security_group_ingress,
                                    GroupId=frontend, IpPermissions=_permissions(changes.revoke_frontend, None))
        if changes.structure_changed:
            await self._sweep(desired.name, set(group_arns.values()) - set(changes.delete_target_groups))
        return dns_name, group_arns

    async def _create_balancer(self, desired: plan.Desired, security_groups: list[str]) -> tuple[str, str]:
        mappings: list[SubnetMappingTypeDef] = [{"SubnetId": s.id} for s in desired.subnets]
        for mapping, allocation in zip(mappings, desired.eip_allocations, strict=False):
            mapping["AllocationId"] = allocation
        try:
            page = await self._run(
                self._elb, self.elbv2.create_load_balancer, Name=desired.name, Type="network",
                IpAddressType=cast("IpAddressTypeType", desired.ip_address_type),
                Scheme="internal" if desired.scheme == plan.SCHEME_INTERNAL else "internet-facing",
                Tags=_elb_tags(desired.tags), SubnetMappings=mappings, SecurityGroups=security_groups,
            )
            created = page["LoadBalancers"][0]
        except TransientProviderError as exc:
            # An earlier attempt whose answer was lost made it already: take that one.
            found = await self._find_balancer(desired.name) if _caused_by(exc, "DuplicateLoadBalancerName") else None
            if found is None:
                raise
            created = found
        return created["LoadBalancerArn"], created.get("DNSName", "")

    async def _set_ip_address_type(self, arn: str, ip_address_type: str) -> None:
        log.info("NLB %s: IP address type becomes %s", arn.rsplit("/", 2)[-2], ip_address_type)
        await self._run(self._elb, self.elbv2.set_ip_address_type, LoadBalancerArn=arn,
                        IpAddressType=cast("IpAddressTypeType", ip_address_type))

    async def _create_target_group(self, tg: plan.TargetGroupPlan, desired: plan.Desired, vpc_id: str) -> str:
        try:
            page = await self._run(
                self._elb, self.elbv2.create_target_group, Name=tg.name, Protocol=cast("ProtocolEnumType", tg.protocol),
                Port=tg.port, VpcId=vpc_id, TargetType="instance", Tags=_elb_tags(desired.tags),
                **_health_args(tg.health),
            )
            return page["TargetGroups"][0]["TargetGroupArn"]
        except TransientProviderError as exc:
            found = await self._target_group_named(tg.name) if _caused_by(exc, "DuplicateTargetGroupName") else None
            if found is None:
                raise
            return found["TargetGroupArn"]

    def _backend_tags(self) -> dict[str, str]:
        return {plan.TAG_CLUSTER_PREFIX + self.cluster_name: "owned", plan.TAG_ROLE: plan.ROLE_BACKEND}

    async def _security_group(
        self, name: str, known: str | None, vpc_id: str, description: str, tags: Mapping[str, str]
    ) -> str:
        """The id of the named group, created (tagged) when missing; names are unique per VPC, so
        a concurrent or crashed earlier attempt cannot make a second one."""
        if known:
            return known
        try:
            page = await self._run(self._ec2, self.ec2.create_security_group, GroupName=name, Description=description,
                                   VpcId=vpc_id, TagSpecifications=[{"ResourceType": "security-group",
                                                                     "Tags": _ec2_tags(tags)}])
            return page["GroupId"]
        except TransientProviderError as exc:
            if not _caused_by(exc, "InvalidGroup.Duplicate"):
                raise
            found = await self._groups([{"Name": "vpc-id", "Values": [vpc_id]},
                                        {"Name": "group-name", "Values": [name]}])
            if not found:
                raise
            return found[0]["GroupId"]

    async def _authorize_frontend(
        self, group_id: str, rules: Sequence[plan.SgRule], tags: Mapping[str, str], balancer_name: str
    ) -> None:
        if not rules:
            return
        spec: list[TagSpecificationTypeDef] = [{"ResourceType": "security-group-rule", "Tags": _ec2_tags(tags)}]
        duplicate = ("InvalidPermission.Duplicate",)
        permissions = _permissions(rules, f"lbctl client {balancer_name}")
        done = await self._run_or_none(self._ec2, duplicate, self.ec2.authorize_security_group_ingress,
                                       GroupId=group_id, IpPermissions=permissions, TagSpecifications=spec)
        if done is None:  # some exist already (a lost answer): add the rest one by one
            for permission in _permissions(rules, f"lbctl client {balancer_name}", split=True):
                await self._run_or_none(self._ec2, duplicate, self.ec2.authorize_security_group_ingress,
                                        GroupId=group_id, IpPermissions=[permission], TagSpecifications=spec)

    async def _open_node_groups(self, node_groups: Sequence[str], backend: str) -> None:
        """One rule per node security group: everything from the cluster's NLBs (their traffic and
        health checks reach only the node ports their target groups name)."""
        spec: list[TagSpecificationTypeDef] = [
            {"ResourceType": "security-group-rule", "Tags": _ec2_tags(self._backend_tags())}]
        for group_id in node_groups:
            await self._run_or_none(
                self._ec2, ("InvalidPermission.Duplicate",), self.ec2.authorize_security_group_ingress,
                GroupId=group_id, TagSpecifications=spec, IpPermissions=[{
                    "IpProtocol": "-1",
                    "UserIdGroupPairs": [{"GroupId": backend, "Description": "lbctl: the cluster's NLBs"}],
                }],
            )

    async def _sweep(self, name: str, keep: set[str]) -> None:
        """After target groups came and went, remove any of this NLB's that nothing uses (left by a
        crash between creating a group and its listener, or between a listener change and the delete)."""
        for tg_arn in await self._own_target_groups(name, ()):
            if tg_arn not in keep:
                await self._run_or_none(self._elb, ("TargetGroupNotFound", "ResourceInUse"),
                                        self.elbv2.delete_target_group, TargetGroupArn=tg_arn)


def _caused_by(exc: BaseException, code: str) -> bool:
    return isinstance(exc.__cause__, ClientError) and _code(exc.__cause__) == code


def _ipv6_block_usable(state: Mapping[str, Any]) -> bool:
    """A subnet's IPv6 block counts unless it is going or gone (associating is about to hold)."""
    return str(state.get("State", "")) not in ("disassociating", "disassociated", "failing", "failed")


def _certificates(listener: plan.ListenerPlan) -> list[CertificateTypeDef]:
    return [{"CertificateArn": listener.certificate_arn}] if listener.certificate_arn else []


async def _nothing() -> frozenset[str]:
    return frozenset()


async def _no_groups() -> list[SecurityGroupTypeDef]:
    return []


def _forward_arn(actions: Sequence[Any]) -> str | None:
    for action in actions:
        if action.get("Type") != "forward":
            continue
        if action.get("TargetGroupArn"):
            return str(action["TargetGroupArn"])
        groups = action.get("ForwardConfig", {}).get("TargetGroups", [])
        if groups:
            return str(groups[0].get("TargetGroupArn"))
    return None


def _observed_listener(raw: Mapping[str, Any]) -> plan.ObservedListener:
    certificates = raw.get("Certificates") or []
    return plan.ObservedListener(
        arn=raw["ListenerArn"], port=int(raw["Port"]), protocol=str(raw["Protocol"]),
        target_group_arn=_forward_arn(raw.get("DefaultActions", [])),
        certificate_arn=certificates[0].get("CertificateArn") if certificates else None,
    )


def _observed_group(
    raw: TargetGroupTypeDef, tags: Mapping[str, str], targets: frozenset[str]
) -> plan.ObservedTargetGroup:
    return plan.ObservedTargetGroup(
        arn=raw["TargetGroupArn"], name=raw["TargetGroupName"], protocol=str(raw.get("Protocol", "")),
        port=int(raw.get("Port", 0)), tags=tags, targets=targets,
        health=plan.health_from_aws(
            raw.get("HealthCheckProtocol"), raw.get("HealthCheckPort"), raw.get("HealthCheckPath"),
            _int(raw.get("HealthCheckIntervalSeconds")), _int(raw.get("HealthCheckTimeoutSeconds")),
            _int(raw.get("HealthyThresholdCount")), _int(raw.get("UnhealthyThresholdCount")),
        ),
    )


def _int(value: object) -> int | None:
    return int(str(value)) if value is not None else None


def _health_args(health: plan.HealthCheck) -> dict[str, Any]:
    args: dict[str, Any] = {
        "HealthCheckEnabled": True,
        "HealthCheckProtocol": health.protocol,
        "HealthCheckPort": health.port,
        "HealthCheckIntervalSeconds": health.interval_s,
        "HealthCheckTimeoutSeconds": health.timeout_s,
        "HealthyThresholdCount": health.healthy_threshold,
        "UnhealthyThresholdCount": health.unhealthy_threshold,
    }
    if health.path is not None:
        args["HealthCheckPath"] = health.path
    return args


def _elb_tags(tags: Mapping[str, str]) -> list[ElbTagTypeDef]:
    return [{"Key": k, "Value": v} for k, v in sorted(tags.items())]


def _forward(tg_arn: str) -> list[ActionTypeDef]:
    return [{"Type": "forward", "TargetGroupArn": tg_arn}]


def _permissions(
    rules: Iterable[plan.SgRule], description: str | None, *, split: bool = False
) -> list[IpPermissionTypeDef]:
    """Rules grouped by protocol and ports, as EC2 takes them (or one permission per rule with split)."""
    grouped: dict[tuple[str, int, int], list[str]] = defaultdict(list)
    single: list[tuple[tuple[str, int, int], list[str]]] = []
    for rule in sorted(rules):
        key = (rule.protocol, rule.from_port, rule.to_port)
        if split:
            single.append((key, [rule.cidr]))
        else:
            grouped[key].append(rule.cidr)
    result: list[IpPermissionTypeDef] = []
    for (protocol, low, high), cidrs in single or sorted(grouped.items()):
        permission: IpPermissionTypeDef = {"IpProtocol": protocol}
        if protocol != "-1":
            permission["FromPort"], permission["ToPort"] = low, high
        v4: list[IpRangeTypeDef] = [{"CidrIp": c} for c in cidrs if ":" not in c]
        v6: list[Ipv6RangeTypeDef] = [{"CidrIpv6": c} for c in cidrs if ":" in c]
        for item in (*v4, *v6):
            if description:
                item["Description"] = description
        if v4:
            permission["IpRanges"] = v4
        if v6:
            permission["Ipv6Ranges"] = v6
        result.append(permission)
    return result


def _rules_of(permission: IpPermissionOutputTypeDef) -> list[plan.SgRule]:
    cidrs = [r["CidrIp"] for r in permission.get("IpRanges", []) if "CidrIp" in r]
    cidrs += [r["CidrIpv6"] for r in permission.get("Ipv6Ranges", []) if "CidrIpv6" in r]
    return plan.rules_from_permission(
        permission.get("IpProtocol", "-1"), permission.get("FromPort"), permission.get("ToPort"), cidrs,
    )


def _admits_group(permission: IpPermissionOutputTypeDef, group_id: str) -> bool:
    return permission.get("IpProtocol") == "-1" and any(
        pair.get("GroupId") == group_id for pair in permission.get("UserIdGroupPairs", [])
    )


def _tag_dict(tags: Iterable[Any]) -> dict[str, str]:
    return {t["Key"]: t.get("Value", "") for t in tags}


def _ec2_tags(tags: Mapping[str, str]) -> list[TagTypeDef]:
    return [{"Key": k, "Value": v} for k, v in sorted(tags.items())]


def _marker(marker: str | None) -> dict[str, Any]:
    return {"Marker": marker} if marker else {}


def _token(token: str | None) -> dict[str, Any]:
    return {"NextToken": token} if token else {}
