"""A stateful fake of the Compute Engine REST API: the part lbctl's GCE provider uses.

There is no Compute Engine emulator, so this stands in for one in tests. It is strict where a
lenient fake would hide bugs:

- every request body is parsed into its ``google.cloud.compute_v1`` type with unknown fields
  refused, and enum-valued strings are checked against the type's enum, so a misspelt field or
  value is a 400 and the test fails (legacy ``httpHealthChecks`` have no compute_v1 type, the
  generated library leaves that service out, so their bodies are checked against the API's field
  list below);
- references are enforced as GCE enforces them: no forwarding rule to a missing target pool or
  backend service, no deleting a target pool, backend service, address, health check or instance
  group something still uses (400 resourceInUseByAnotherResource), 409 alreadyExists on a
  duplicate name, 404 notFound;
- it refuses redundant membership writes (adding a member twice, removing a non-member) so a
  client must compute exact diffs;
- operations come back already DONE (the client library polls operations on the default
  endpoint, not a custom one), unless ``operation_polls`` asks for some polls first;
- lists page (maxResults, pageToken/nextPageToken);
- faults are injected per method (``inject("targetPools.insert", status=429, times=2)``), either
  as the HTTP answer or inside the returned operation, as GCE reports quota errors;
- every call is recorded as (method, verb, path) so tests can count them.

Run on its own: ``python tests/fakes/gce_server.py --port 0`` prints its URL and serves until
killed. Control over HTTP: POST /_fake/inject (JSON like `inject`'s arguments), GET /_fake/calls,
POST /_fake/reset, GET /_fake/resources/<collection>.
"""

from __future__ import annotations

import argparse
import enum
import ipaddress
import itertools
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import proto  # type: ignore[import-untyped]
from google.cloud import compute_v1
from google.protobuf.json_format import ParseError  # type: ignore[import-untyped]

BASE_URL = "https://www.googleapis.com/compute/v1/"
Json = dict[str, Any]

_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_PATH = re.compile(
    r"^/compute/v1/projects/(?P<project>[^/]+)/(?:(?P<global>global)|regions/(?P<region>[^/]+)|zones/(?P<zone>[^/]+))"
    r"/(?P<segment>[A-Za-z]+)(?:/(?P<name>[^/]+)(?:/(?P<action>[A-Za-z]+))?)?$"
)
_REGION = re.compile(r"^/compute/v1/projects/(?P<project>[^/]+)/regions/(?P<region>[^/]+)$")
_REF = re.compile(
    r"^projects/(?P<project>[^/]+)/(?:(?P<global>global)|regions/(?P<region>[^/]+)|zones/(?P<zone>[^/]+))"
    r"/(?P<segment>[A-Za-z]+)/(?P<name>[^/]+)$"
)
_QUERY = frozenset({"maxResults", "pageToken", "filter", "orderBy", "returnPartialSuccess", "requestId", "$alt",
                    "alt"})


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message

    def body(self) -> Json:
        return {"error": {"code": self.status, "message": self.message,
                          "errors": [{"message": self.message, "domain": "global", "reason": self.reason}]}}


@dataclass(frozen=True)
class Collection:
    key: str  # the method prefix, e.g. "regionBackendServices"
    scope: str  # global, regions or zones
    segment: str  # the URL segment, e.g. "backendServices"
    kind: str
    message: Any  # the compute_v1 type of its bodies; None for legacy httpHealthChecks


COLLECTIONS = (
    Collection("addresses", "regions", "addresses", "compute#address", compute_v1.Address),
    Collection("firewalls", "global", "firewalls", "compute#firewall", compute_v1.Firewall),
    Collection("httpHealthChecks", "global", "httpHealthChecks", "compute#httpHealthCheck", None),
    Collection("regionHealthChecks", "regions", "healthChecks", "compute#healthCheck", compute_v1.HealthCheck),
    Collection("targetPools", "regions", "targetPools", "compute#targetPool", compute_v1.TargetPool),
    Collection("forwardingRules", "regions", "forwardingRules", "compute#forwardingRule", compute_v1.ForwardingRule),
    Collection("regionBackendServices", "regions", "backendServices", "compute#backendService",
               compute_v1.BackendService),
    Collection("instanceGroups", "zones", "instanceGroups", "compute#instanceGroup", compute_v1.InstanceGroup),
    Collection("instances", "zones", "instances", "compute#instance", compute_v1.Instance),
    Collection("subnetworks", "regions", "subnetworks", "compute#subnetwork", compute_v1.Subnetwork),
    Collection("networks", "global", "networks", "compute#network", compute_v1.Network),
)
_BY_ROUTE = {(c.scope, c.segment): c for c in COLLECTIONS}
BY_KEY = {c.key: c for c in COLLECTIONS}

_ACTIONS: dict[tuple[str, str], Any] = {
    ("targetPools", "addInstance"): compute_v1.TargetPoolsAddInstanceRequest,
    ("targetPools", "removeInstance"): compute_v1.TargetPoolsRemoveInstanceRequest,
    ("targetPools", "addHealthCheck"): compute_v1.TargetPoolsAddHealthCheckRequest,
    ("targetPools", "removeHealthCheck"): compute_v1.TargetPoolsRemoveHealthCheckRequest,
    ("instanceGroups", "addInstances"): compute_v1.InstanceGroupsAddInstancesRequest,
    ("instanceGroups", "removeInstances"): compute_v1.InstanceGroupsRemoveInstancesRequest,
    ("instanceGroups", "listInstances"): compute_v1.InstanceGroupsListInstancesRequest,
}
READ_VERBS = frozenset({"get", "list", "listInstances"})

# The legacy HttpHealthCheck resource as the REST API documents it.
LEGACY_HTTP_HEALTH_CHECK_FIELDS: dict[str, type] = {
    "name": str, "description": str, "host": str, "requestPath": str, "port": int, "checkIntervalSec": int,
    "timeoutSec": int, "healthyThreshold": int, "unhealthyThreshold": int, "kind": str, "id": str,
    "selfLink": str, "creationTimestamp": str,
}
# Fields the server sets; a body may carry them (read-modify-write) and they are kept as the server has them.
_OUTPUT_ONLY = frozenset({"id", "kind", "selfLink", "creationTimestamp", "region", "zone", "users", "status",
                          "fingerprint", "size", "selfLinkWithId"})


@dataclass(frozen=True)
class Call:
    method: str  # e.g. "targetPools.addInstance"
    verb: str
    path: str

    @property
    def write(self) -> bool:
        return self.method.rsplit(".", 1)[-1] not in READ_VERBS and not self.method.endswith("Operations.get")


@dataclass
class Fault:
    status: int
    reason: str
    message: str
    times: int
    in_operation: bool
    after: int = 0  # matching calls to let through first


_DEFAULT_REASONS = {429: "rateLimitExceeded", 403: "QUOTA_EXCEEDED", 500: "backendError", 503: "backendError"}


def enum_problems(message: Any, where: str = "") -> list[str]:
    """Enum-valued string fields (compute_v1 keeps them as str) holding a value the enum lacks."""
    problems: list[str] = []
    cls = type(message)
    for name, fld in cls.meta.fields.items():
        if name not in message:
            continue
        value = getattr(message, name)
        if fld.message is not None:
            items = value if fld.repeated else [value]
            for index, item in enumerate(items):
                problems += enum_problems(item, f"{where}{name}[{index}]." if fld.repeated else f"{where}{name}.")
            continue
        if fld.proto_type != proto.STRING or fld.repeated:
            continue
        camel = "".join(part[:1].upper() + part[1:] for part in name.rstrip("_").split("_"))
        for candidate in (camel, camel + "Enum"):
            enum_type = cls.__dict__.get(candidate)
            if isinstance(enum_type, type) and issubclass(enum_type, enum.Enum):
                if value not in enum_type.__members__ or value.startswith("UNDEFINED"):
                    problems.append(f"{where}{name}: {value!r} is not one of {sorted(enum_type.__members__)}")
                break
    return problems


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000-00:00", time.gmtime())


def _port_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high or low)


class FakeCompute:
    """The API's state and semantics, independent of HTTP (the server below only carries bytes)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.calls: list[Call] = []
        self.operation_polls = 0  # polls an operation answers RUNNING before DONE
        self._faults: dict[str, list[Fault]] = {}
        self._store: dict[tuple[str, str, str], dict[str, Json]] = {}
        self._members: dict[tuple[str, str, str], list[str]] = {}  # instance group -> instance URLs
        self._operations: dict[tuple[str, str, str], Json] = {}
        self._pending: dict[tuple[str, str, str], int] = {}
        self._ids = itertools.count(1000)
        self._external_ips = itertools.count(10)
        self._internal_ips = itertools.count(200 * 256)
        self._instance_ips = itertools.count(2)
        self._ipv6_prefixes = itertools.count(1)
        self._ipv6_hosts = itertools.count(0x100)
        # the regions that exist (None: any region name answers, with zones a to d)
        self.regions: set[str] | None = None

    # -- test API ----------------------------------------------------------------------------

    def inject(self, method: str, *, status: int, reason: str | None = None, times: int = 1,
               in_operation: bool = False, message: str | None = None, after: int = 0) -> None:
        """Fail the next `times` calls of `method` (after letting `after` through) with `status`,
        as the HTTP answer or, with `in_operation`, inside a DONE operation as GCE reports quota."""
        with self.lock:
            reason = reason or _DEFAULT_REASONS.get(status, "error")
            message = message or (f"Quota exceeded for {method}" if reason in ("QUOTA_EXCEEDED", "quotaExceeded")
                                  else f"injected {status} {reason} on {method}")
            self._faults.setdefault(method, []).append(Fault(status, reason, message, times, in_operation, after))

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    def resources(self, key: str) -> list[Json]:
        """Every stored resource of a collection (all projects and locations), as the API shows it."""
        with self.lock:
            out = []
            for (coll, project, location), items in sorted(self._store.items()):
                if coll == key:
                    out += [self._present(BY_KEY[key], project, location, item) for _, item in sorted(items.items())]
            return out

    def members(self, zone: str, group: str, project: str | None = None) -> list[str]:
        with self.lock:
            return sorted(url for (p, z, g), urls in self._members.items()
                          if z == zone and g == group and project in (None, p) for url in urls)

    # -- request handling --------------------------------------------------------------------

    def handle(self, verb: str, path: str, query: dict[str, list[str]], raw: bytes) -> tuple[int, Json]:
        with self.lock:
            region = _REGION.match(path)
            if region is not None and verb == "GET":
                self.calls.append(Call("regions.get", verb, path))
                fault = self._take_fault("regions.get")
                if fault is not None:
                    return fault.status, ApiError(fault.status, fault.reason, fault.message).body()
                if self.regions is not None and region["region"] not in self.regions:
                    path = f"projects/{region['project']}/regions/{region['region']}"
                    return 404, ApiError(404, "notFound", f"The resource '{path}' was not found").body()
                return 200, self._region(region["project"], region["region"])
            match = _PATH.match(path)
            if match is None:
                return 404, ApiError(404, "notFound", f"no such API path {path}").body()
            project = match["project"]
            scope = "global" if match["global"] else "regions" if match["region"] else "zones"
            location = match["region"] or match["zone"] or ""
            segment, name, action = match["segment"], match["name"], match["action"]
            method = self._method_name(verb, scope, segment, name, action)
            self.calls.append(Call(method or f"unknown {verb}", verb, path))
            try:
                if method is None:
                    raise ApiError(404, "notFound", f"{verb} {path} is not implemented by the fake")
                unknown = sorted(set(query) - _QUERY)
                if unknown:
                    raise ApiError(400, "invalidParameter", f"unknown query parameter(s) {unknown}")
                if query.get("filter", [""])[0]:
                    raise ApiError(400, "invalid", "the fake does not implement filter")
                fault = self._take_fault(method)
                if fault is not None and not fault.in_operation:
                    raise ApiError(fault.status, fault.reason, fault.message)
                body = self._body(raw)
                if segment == "operations":
                    return 200, self._get_operation(project, scope, location, name or "")
                coll = _BY_ROUTE[(scope, segment)]
                return 200, self._dispatch(coll, project, location, name, action, verb, query, body, fault)
            except ApiError as exc:
                return exc.status, exc.body()

    def _method_name(self, verb: str, scope: str, segment: str, name: str | None, action: str | None) -> str | None:
        if segment == "operations":
            prefix = {"global": "globalOperations", "regions": "regionOperations", "zones": "zoneOperations"}[scope]
            return f"{prefix}.get" if verb == "GET" and name and not action else None
        coll = _BY_ROUTE.get((scope, segment))
        if coll is None:
            return None
        if action:
            return f"{coll.key}.{action}" if verb == "POST" and (coll.key, action) in _ACTIONS else None
        verbs = {("GET", False): "list", ("POST", False): "insert", ("GET", True): "get", ("DELETE", True): "delete",
                 ("PATCH", True): "patch", ("PUT", True): "update"}
        found = verbs.get((verb, name is not None))
        return f"{coll.key}.{found}" if found else None

    def _take_fault(self, method: str) -> Fault | None:
        queue = self._faults.get(method)
        if not queue:
            return None
        fault = queue[0]
        if fault.after > 0:
            fault.after -= 1
            return None
        fault.times -= 1
        if fault.times <= 0:
            queue.pop(0)
        return fault

    @staticmethod
    def _body(raw: bytes) -> Json | None:
        if not raw.strip():
            return None
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, "parseError", f"body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "parseError", "body is not a JSON object")
        return body

    def _dispatch(self, coll: Collection, project: str, location: str, name: str | None, action: str | None,
                  verb: str, query: dict[str, list[str]], body: Json | None, fault: Fault | None) -> Json:
        if action:
            self._parse(_ACTIONS[(coll.key, action)], body or {}, f"{coll.key}.{action}")
            item = self._get(coll, project, location, name or "")
            if action == "listInstances":
                return self._list_instances(item, project, location, query)
            return self._act(coll, project, location, item, action, body or {}, fault)
        if verb == "GET" and name is None:
            return self._list(coll, project, location, query)
        if verb == "GET":
            return self._present(coll, project, location, self._get(coll, project, location, name or ""))
        if verb == "POST":
            return self._insert(coll, project, location, body, fault)
        if verb == "DELETE":
            return self._delete(coll, project, location, name or "", fault)
        return self._modify(coll, project, location, name or "", body, fault, replace=verb == "PUT")

    # -- parsing and references --------------------------------------------------------------

    def _parse(self, message_type: Any, body: Json, what: str) -> Any:
        if message_type is None:
            for key, value in body.items():
                expected = LEGACY_HTTP_HEALTH_CHECK_FIELDS.get(key)
                if expected is None:
                    raise ApiError(400, "invalid", f"{what}: unknown field {key!r} in HttpHealthCheck")
                if not isinstance(value, expected) and not (expected is int and isinstance(value, str)
                                                            and value.isdigit()):
                    raise ApiError(400, "invalid", f"{what}: field {key!r} must be {expected.__name__}")
            return None
        try:
            message = message_type.from_json(json.dumps(body), ignore_unknown_fields=False)
        except (ParseError, ValueError, TypeError) as exc:
            raise ApiError(400, "invalid", f"Invalid JSON payload received for {what}. {exc}") from None
        problems = enum_problems(message)
        if problems:
            raise ApiError(400, "invalid", f"Invalid value in {what}: {'; '.join(problems)}")
        return message

    def _items(self, key: str, project: str, location: str) -> dict[str, Json]:
        return self._store.setdefault((key, project, location), {})

    def _get(self, coll: Collection, project: str, location: str, name: str) -> Json:
        item = self._items(coll.key, project, location).get(name)
        if item is None and coll.key == "networks" and name == "default":  # every project starts with one
            return {"kind": coll.kind, "name": name, "id": "1", "autoCreateSubnetworks": True,
                    "selfLink": self._link(coll, project, location, name)}
        if item is None:
            raise ApiError(404, "notFound",
                           f"The resource '{self._path(coll, project, location, name)}' was not found")
        return item

    @staticmethod
    def _path(coll: Collection, project: str, location: str, name: str) -> str:
        where = "global" if coll.scope == "global" else f"{coll.scope}/{location}"
        return f"projects/{project}/{where}/{coll.segment}/{name}"

    def _link(self, coll: Collection, project: str, location: str, name: str) -> str:
        return BASE_URL + self._path(coll, project, location, name)

    def _resolve(self, url: str, project: str, expect: Iterable[str], field: str) -> tuple[Collection, str, str, Json]:
        """A referenced resource (full or partial URL) that must exist in one of `expect`."""
        path = url[url.find("projects/"):] if "projects/" in url else f"projects/{project}/{url.lstrip('/')}"
        match = _REF.match(path)
        scope = "" if match is None else "global" if match["global"] else "regions" if match["region"] else "zones"
        coll = None if match is None else _BY_ROUTE.get((scope, match["segment"]))
        if match is None or coll is None or coll.key not in set(expect):
            raise ApiError(400, "invalid", f"Invalid value for field '{field}': '{url}'")
        location = match["region"] or match["zone"] or ""
        item = self._items(coll.key, match["project"], location).get(match["name"])
        if item is None:
            raise ApiError(404, "notFound", f"The resource '{path}' was not found")
        return coll, match["project"], location, item

    @staticmethod
    def _canon(url: str) -> str:
        return url[url.find("projects/"):] if "projects/" in url else url

    # -- reads -------------------------------------------------------------------------------

    def _present(self, coll: Collection, project: str, location: str, item: Json) -> Json:
        out: Json = json.loads(json.dumps(item))
        if coll.key == "addresses":
            users = self._address_users(project, location, item)
            out["users"] = users
            out["status"] = "IN_USE" if users else "RESERVED"
        if coll.key == "instanceGroups":
            out["size"] = len(self._members.get((project, location, item["name"]), []))
        return out

    def _page(self, items: list[Json], query: dict[str, list[str]], kind: str, link: str) -> Json:
        try:
            size = min(int(query.get("maxResults", ["500"])[0]), 500)
            start = int(query.get("pageToken", ["0"])[0] or 0)
        except ValueError:
            raise ApiError(400, "invalid", "bad maxResults or pageToken") from None
        if size <= 0:
            raise ApiError(400, "invalid", "maxResults must be positive")
        page = items[start:start + size]
        out: Json = {"kind": kind, "id": link, "selfLink": link, "items": page}
        if start + size < len(items):
            out["nextPageToken"] = str(start + size)
        return out

    def _list(self, coll: Collection, project: str, location: str, query: dict[str, list[str]]) -> Json:
        items = [self._present(coll, project, location, item)
                 for _, item in sorted(self._items(coll.key, project, location).items())]
        link = self._link(coll, project, location, "").rstrip("/")
        return self._page(items, query, coll.kind + "List", link)

    def _list_instances(self, group: Json, project: str, zone: str, query: dict[str, list[str]]) -> Json:
        urls = self._members.get((project, zone, group["name"]), [])
        items = [{"instance": url, "status": "RUNNING"} for url in sorted(urls)]
        return self._page(items, query, "compute#instanceGroupsListInstances", group["selfLink"] + "/listInstances")

    def _region(self, project: str, region: str) -> Json:
        """A region's zones: a, b, c, d, and any other zone of it that holds something."""
        zones = {f"{region}-{suffix}" for suffix in "abcd"}
        zones |= {location for (_, p, location) in self._store
                  if p == project and location.startswith(region + "-")}
        return {"kind": "compute#region", "name": region, "status": "UP",
                "selfLink": f"{BASE_URL}projects/{project}/regions/{region}",
                "zones": [f"{BASE_URL}projects/{project}/zones/{zone}" for zone in sorted(zones)]}

    # -- operations --------------------------------------------------------------------------

    def _operation(self, coll: Collection, project: str, location: str, kind: str, target: str,
                   fault: Fault | None) -> Json:
        name = f"operation-{next(self._ids)}"
        where = "global" if coll.scope == "global" else f"{coll.scope}/{location}"
        op: Json = {
            "kind": "compute#operation", "id": str(next(self._ids)), "name": name, "operationType": kind,
            "targetLink": target, "status": "DONE", "progress": 100, "insertTime": _now(), "startTime": _now(),
            "endTime": _now(), "selfLink": f"{BASE_URL}projects/{project}/{where}/operations/{name}",
        }
        if coll.scope == "regions":
            op["region"] = f"{BASE_URL}projects/{project}/regions/{location}"
        elif coll.scope == "zones":
            op["zone"] = f"{BASE_URL}projects/{project}/zones/{location}"
        if fault is not None:
            op["error"] = {"errors": [{"code": fault.reason, "message": fault.message}]}
            op["httpErrorStatusCode"] = fault.status
            op["httpErrorMessage"] = {403: "FORBIDDEN", 429: "TOO MANY REQUESTS"}.get(fault.status, "ERROR")
        key = (project, where, name)
        self._operations[key] = op
        if self.operation_polls > 0:
            self._pending[key] = self.operation_polls
            return dict(op, status="RUNNING", progress=0)
        return op

    def _get_operation(self, project: str, scope: str, location: str, name: str) -> Json:
        where = "global" if scope == "global" else f"{scope}/{location}"
        key = (project, where, name)
        op = self._operations.get(key)
        if op is None:
            raise ApiError(404, "notFound",
                           f"The resource 'projects/{project}/{where}/operations/{name}' was not found")
        left = self._pending.get(key, 0)
        if left > 0:
            self._pending[key] = left - 1
            return dict(op, status="RUNNING", progress=0)
        return op

    def _commit(self, coll: Collection, project: str, location: str, kind: str, target: str,
                fault: Fault | None, apply: Callable[[], None]) -> Json:
        """Everything validated: apply the change unless a fault is to be reported in the operation."""
        if fault is None:
            apply()
        return self._operation(coll, project, location, kind, target, fault)

    # -- writes ------------------------------------------------------------------------------

    def _insert(self, coll: Collection, project: str, location: str, body: Json | None, fault: Fault | None) -> Json:
        if body is None:
            raise ApiError(400, "required", f"{coll.key}.insert needs a body")
        self._parse(coll.message, body, f"{coll.key}.insert")
        name = body.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ApiError(400, "invalid", f"Invalid value for field 'resource.name': {name!r}. Must be a match of "
                                           "regex '(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'")
        items = self._items(coll.key, project, location)
        link = self._link(coll, project, location, name)
        if name in items:
            raise ApiError(409, "alreadyExists", f"The resource '{self._path(coll, project, location, name)}' "
                                                 "already exists")
        item = {key: value for key, value in body.items() if key not in _OUTPUT_ONLY}
        item.update(kind=coll.kind, id=str(next(self._ids)), selfLink=link, creationTimestamp=_now())
        if coll.scope == "regions":
            item["region"] = f"{BASE_URL}projects/{project}/regions/{location}"
        elif coll.scope == "zones":
            item["zone"] = f"{BASE_URL}projects/{project}/zones/{location}"
        getattr(self, f"_check_{coll.key}")(project, location, item, True)

        def apply() -> None:
            items[name] = item
            if coll.key == "instanceGroups":
                self._members[(project, location, name)] = []

        return self._commit(coll, project, location, "insert", link, fault, apply)

    def _modify(self, coll: Collection, project: str, location: str, name: str, body: Json | None,
                fault: Fault | None, *, replace: bool) -> Json:
        what = f"{coll.key}.{'update' if replace else 'patch'}"
        if coll.key not in ("firewalls", "httpHealthChecks", "regionHealthChecks", "regionBackendServices",
                            "subnetworks"):
            raise ApiError(405, "methodNotAllowed", f"{what} is not supported")
        if body is None:
            raise ApiError(400, "required", f"{what} needs a body")
        self._parse(coll.message, body, what)
        current = self._get(coll, project, location, name)
        if body.get("name", name) != name:
            raise ApiError(400, "invalid", f"{what}: the name cannot change")
        if "fingerprint" in body and body["fingerprint"] != current.get("fingerprint"):
            raise ApiError(412, "conditionNotMet", f"{what}: fingerprint does not match")
        kept = {key: value for key, value in current.items() if key in _OUTPUT_ONLY or key == "name"}
        changes = {key: value for key, value in body.items() if key not in _OUTPUT_ONLY}
        item = {**kept, **changes} if replace else {**current, **changes}
        getattr(self, f"_check_{coll.key}")(project, location, item, False)

        def apply() -> None:
            self._items(coll.key, project, location)[name] = item

        return self._commit(coll, project, location, "update" if replace else "patch", current["selfLink"], fault,
                            apply)

    def _delete(self, coll: Collection, project: str, location: str, name: str, fault: Fault | None) -> Json:
        item = self._get(coll, project, location, name)
        users = self._users(coll, project, location, item)
        if users:
            raise ApiError(400, "resourceInUseByAnotherResource",
                           f"The {coll.segment[:-1]} resource '{self._path(coll, project, location, name)}' is "
                           f"already being used by '{self._canon(users[0])}'")

        def apply() -> None:
            del self._items(coll.key, project, location)[name]
            if coll.key == "instanceGroups":
                self._members.pop((project, location, name), None)
            if coll.key == "instances":  # GCE drops a deleted VM from unmanaged groups
                gone = self._canon(item["selfLink"])
                for key, urls in self._members.items():
                    self._members[key] = [url for url in urls if self._canon(url) != gone]

        return self._commit(coll, project, location, "delete", item["selfLink"], fault, apply)

    def _act(self, coll: Collection, project: str, location: str, item: Json, action: str, body: Json,
             fault: Fault | None) -> Json:
        where = f"{coll.key}.{action}"
        if coll.key == "targetPools" and action in ("addInstance", "removeInstance"):
            refs = [entry.get("instance", "") for entry in body.get("instances", [])]
            if not refs:
                raise ApiError(400, "required", f"{where}: instances is empty")
            current = list(item.get("instances", []))
            canon = [self._canon(url) for url in current]
            if action == "addInstance":
                links = []
                for ref in refs:
                    _, _, zone, instance = self._resolve(ref, project, ["instances"], "instances")
                    self._check_zone_in_region(zone, location, where)
                    if self._canon(instance["selfLink"]) in canon or instance["selfLink"] in links:
                        raise ApiError(400, "alreadyInPool", f"{where}: {instance['selfLink']} is already in the pool")
                    links.append(instance["selfLink"])
                updated = current + links
            else:
                drop = {self._canon(ref) for ref in refs}
                missing = drop - set(canon)
                if missing:
                    raise ApiError(400, "notInPool", f"{where}: {sorted(missing)} not in the pool")
                updated = [url for url in current if self._canon(url) not in drop]
            return self._commit(coll, project, location, action, item["selfLink"], fault,
                                lambda: item.__setitem__("instances", updated))
        if coll.key == "targetPools":
            refs = [entry.get("healthCheck", "") for entry in body.get("healthChecks", [])]
            current = list(item.get("healthChecks", []))
            if action == "addHealthCheck":
                links = [self._resolve(ref, project, ["httpHealthChecks"], "healthChecks")[3]["selfLink"]
                         for ref in refs]
                if len(current) + len(links) > 1:
                    raise ApiError(400, "invalid", f"{where}: a target pool takes at most one health check")
                updated = current + links
            else:
                drop = {self._canon(ref) for ref in refs}
                if not drop <= {self._canon(url) for url in current}:
                    raise ApiError(400, "invalid", f"{where}: health check not attached")
                updated = [url for url in current if self._canon(url) not in drop]
            return self._commit(coll, project, location, action, item["selfLink"], fault,
                                lambda: item.__setitem__("healthChecks", updated))
        # instance groups
        refs = [entry.get("instance", "") for entry in body.get("instances", [])]
        if not refs:
            raise ApiError(400, "required", f"{where}: instances is empty")
        key = (project, location, item["name"])
        members = list(self._members.get(key, []))
        member_paths = {self._canon(url) for url in members}
        if action == "addInstances":
            links = []
            for ref in refs:
                _, _, zone, instance = self._resolve(ref, project, ["instances"], "instances")
                if zone != location:
                    raise ApiError(400, "invalid", f"{where}: {ref} is in zone {zone}, the group in {location}")
                if self._canon(instance["selfLink"]) in member_paths or instance["selfLink"] in links:
                    raise ApiError(400, "memberAlreadyExists", f"{where}: {ref} is already a member")
                links.append(instance["selfLink"])
            updated = members + links
        else:
            drop = {self._canon(ref) for ref in refs}
            if not drop <= member_paths:
                raise ApiError(400, "memberNotFound", f"{where}: {sorted(drop - member_paths)} are not members")
            updated = [url for url in members if self._canon(url) not in drop]
        return self._commit(coll, project, location, action, item["selfLink"], fault,
                            lambda: self._members.__setitem__(key, updated))

    # -- what uses what ----------------------------------------------------------------------

    def _address_users(self, project: str, region: str, address: Json) -> list[str]:
        link = self._canon(address["selfLink"])
        return [rule["selfLink"] for _, rule in sorted(self._items("forwardingRules", project, region).items())
                if rule.get("IPAddress") == address.get("address") or self._canon(rule.get("IPAddress", "")) == link]

    def _users(self, coll: Collection, project: str, location: str, item: Json) -> list[str]:
        link = self._canon(item["selfLink"])

        def scan(key: str, refs: Callable[[Json], list[str]]) -> list[str]:
            found = []
            for (k, p, _), items in self._store.items():
                if k == key and p == project:
                    found += [other["selfLink"] for other in items.values()
                              if link in (self._canon(ref) for ref in refs(other))]
            return found

        if coll.key == "addresses":
            return self._address_users(project, location, item)
        if coll.key == "targetPools":
            return scan("forwardingRules", lambda rule: [rule.get("target", "")])
        if coll.key == "regionBackendServices":
            return scan("forwardingRules", lambda rule: [rule.get("backendService", "")])
        if coll.key == "httpHealthChecks":
            return scan("targetPools", lambda pool: list(pool.get("healthChecks", [])))
        if coll.key == "regionHealthChecks":
            return scan("regionBackendServices", lambda service: list(service.get("healthChecks", [])))
        if coll.key == "instanceGroups":
            return scan("regionBackendServices",
                        lambda service: [backend.get("group", "") for backend in service.get("backends", [])])
        if coll.key == "subnetworks":
            return (scan("addresses", lambda address: [address.get("subnetwork", "")])
                    + scan("forwardingRules", lambda rule: [rule.get("subnetwork", "")]))
        return []

    # -- per-collection rules ----------------------------------------------------------------

    @staticmethod
    def _check_zone_in_region(zone: str, region: str, where: str) -> None:
        if not zone.startswith(region + "-"):
            raise ApiError(400, "invalid", f"{where}: zone {zone} is not in region {region}")

    def _all_addresses(self, project: str, region: str) -> list[Json]:
        return list(self._items("addresses", project, region).values())

    def _subnetwork(self, project: str, region: str, url: str, where: str) -> Json:
        """The subnetwork a reference names; it must exist and be in the region."""
        if not url:
            raise ApiError(400, "required", f"{where}: Required field 'subnetwork' not specified")
        _, _, location, subnetwork = self._resolve(url, project, ["subnetworks"], f"{where}.subnetwork")
        if location != region:
            raise ApiError(400, "invalid", f"{where}: subnetwork {subnetwork['name']} is not in region {region}")
        return subnetwork

    def _ipv6_subnetwork(self, project: str, region: str, url: str, where: str) -> Json:
        """IPv6 internal addresses and forwarding rules need a subnetwork with internal IPv6, as GCE says."""
        subnetwork = self._subnetwork(project, region, url, where)
        if subnetwork.get("stackType", "IPV4_ONLY") == "IPV4_ONLY":
            raise ApiError(400, "invalid", f"{where}: IPv6 is not enabled on subnetwork {subnetwork['name']} "
                                           "(stackType IPV4_ONLY)")
        if subnetwork.get("ipv6AccessType") != "INTERNAL":
            raise ApiError(400, "invalid", f"{where}: subnetwork {subnetwork['name']} has no internal IPv6 range "
                                           f"(ipv6AccessType {subnetwork.get('ipv6AccessType')})")
        return subnetwork

    def _next_ipv6(self, subnetwork: Json) -> str:
        prefix = ipaddress.IPv6Network(subnetwork["internalIpv6Prefix"])
        return str(prefix.network_address + next(self._ipv6_hosts))

    def _check_networks(self, project: str, _: str, item: Json, creating: bool) -> None:
        item.setdefault("autoCreateSubnetworks", True)

    def _check_subnetworks(self, project: str, region: str, item: Json, creating: bool) -> None:
        item.setdefault("network", f"{BASE_URL}projects/{project}/global/networks/default")
        if not item.get("ipCidrRange"):
            raise ApiError(400, "required", "Required field 'ipCidrRange' not specified")
        try:
            ipaddress.IPv4Network(item["ipCidrRange"])
        except ValueError:
            raise ApiError(400, "invalid", f"Invalid value for field 'resource.ipCidrRange': "
                                           f"{item['ipCidrRange']!r}") from None
        stack = item.setdefault("stackType", "IPV4_ONLY")
        access = item.get("ipv6AccessType")
        if stack == "IPV4_ONLY":
            if access:
                raise ApiError(400, "invalid", "ipv6AccessType needs stackType IPV4_IPV6")
            for key in ("internalIpv6Prefix", "externalIpv6Prefix"):
                item.pop(key, None)
            return
        if access not in ("INTERNAL", "EXTERNAL"):
            raise ApiError(400, "required", f"stackType {stack} needs ipv6AccessType INTERNAL or EXTERNAL")
        key = "internalIpv6Prefix" if access == "INTERNAL" else "externalIpv6Prefix"
        if not item.get(key):  # GCE picks a /64 from the network's ULA /48 (internal) or its own (external)
            base = "fd20:0:0" if access == "INTERNAL" else "2600:1900:4000"
            item[key] = f"{base}:{next(self._ipv6_prefixes):x}::/64"

    def _check_addresses(self, project: str, region: str, item: Json, creating: bool) -> None:
        if item.get("ipVersion") == "IPV6":
            if item.get("addressType", "EXTERNAL") != "INTERNAL":
                raise ApiError(400, "invalid", "the fake implements IPv6 addresses of addressType INTERNAL only")
            subnetwork = self._ipv6_subnetwork(project, region, item.get("subnetwork", ""), "addresses.insert")
            item["subnetwork"] = subnetwork["selfLink"]
            item.setdefault("purpose", "GCE_ENDPOINT")
            if "address" in item:
                try:
                    given = ipaddress.IPv6Address(item["address"])
                except ValueError:
                    raise ApiError(400, "invalid", f"Invalid value for field 'resource.address': "
                                                   f"{item['address']!r}") from None
                if given not in ipaddress.IPv6Network(subnetwork["internalIpv6Prefix"]):
                    raise ApiError(400, "invalid", f"{given} is outside subnetwork {subnetwork['name']}'s range")
                item["address"] = str(given)
            else:
                item["address"] = self._next_ipv6(subnetwork)
            item["prefixLength"] = 128
            return
        address_type = item.setdefault("addressType", "EXTERNAL")
        if address_type == "EXTERNAL":
            item.setdefault("networkTier", "PREMIUM")
            if "subnetwork" in item:
                raise ApiError(400, "invalid", "an external address takes no subnetwork")
        else:
            if not item.get("subnetwork"):
                raise ApiError(400, "required", "Required field 'subnetwork' not specified for an internal address")
            item.setdefault("purpose", "GCE_ENDPOINT")
        if "address" in item:
            try:
                ipaddress.IPv4Address(item["address"])
            except ValueError:
                raise ApiError(400, "invalid", f"Invalid value for field 'resource.address': {item['address']!r}") \
                    from None
            if any(other.get("address") == item["address"] for other in self._all_addresses(project, region)):
                raise ApiError(400, "ipInUse", f"IP address {item['address']} is already reserved")
        elif address_type == "EXTERNAL":
            item["address"] = str(ipaddress.IPv4Address("35.200.0.0") + next(self._external_ips))
        else:
            item["address"] = str(ipaddress.IPv4Address("10.128.0.0") + next(self._internal_ips))

    def _check_firewalls(self, project: str, _: str, item: Json, creating: bool) -> None:
        item.setdefault("network", f"{BASE_URL}projects/{project}/global/networks/default")
        item.setdefault("direction", "INGRESS")
        item.setdefault("priority", 1000)
        if not item.get("allowed") and not item.get("denied"):
            raise ApiError(400, "required", "a firewall needs allowed or denied")
        for entry in item.get("allowed", []):
            if not entry.get("IPProtocol"):
                raise ApiError(400, "required", "allowed[].IPProtocol is required")
            for port in entry.get("ports", []):
                low, high = _port_range(str(port)) if re.fullmatch(r"\d+(-\d+)?", str(port)) else (0, 0)
                if not 1 <= low <= high <= 65535:
                    raise ApiError(400, "invalid", f"Invalid value for field 'resource.allowed[].ports': {port!r}")
        versions = set()
        for text in item.get("sourceRanges", []):
            try:
                versions.add(ipaddress.ip_network(text).version)
            except ValueError:
                raise ApiError(400, "invalid", f"Invalid value for field 'resource.sourceRanges': {text!r}") from None
        if len(versions) > 1:
            raise ApiError(400, "invalid", "a firewall's sourceRanges cannot mix IPv4 and IPv6 ranges")

    def _check_httpHealthChecks(self, project: str, _: str, item: Json, creating: bool) -> None:
        for key, default in (("port", 80), ("requestPath", "/"), ("checkIntervalSec", 5), ("timeoutSec", 5),
                             ("healthyThreshold", 2), ("unhealthyThreshold", 2)):
            item.setdefault(key, default)
        item["port"] = int(item["port"])
        if not 1 <= item["port"] <= 65535:
            raise ApiError(400, "invalid", f"Invalid value for field 'resource.port': {item['port']}")

    def _check_regionHealthChecks(self, project: str, _: str, item: Json, creating: bool) -> None:
        kind = str(item.get("type", ""))
        blocks = {"HTTP": "httpHealthCheck", "TCP": "tcpHealthCheck", "HTTPS": "httpsHealthCheck"}
        if kind not in blocks or blocks[kind] not in item:
            raise ApiError(400, "invalid", f"a health check of type {kind!r} needs its {blocks.get(kind, '?')} block")
        for key, default in (("checkIntervalSec", 5), ("timeoutSec", 5), ("healthyThreshold", 2),
                             ("unhealthyThreshold", 2)):
            item.setdefault(key, default)

    def _check_targetPools(self, project: str, region: str, item: Json, creating: bool) -> None:
        item.setdefault("sessionAffinity", "NONE")
        links = []
        for ref in item.get("instances", []):
            _, _, zone, instance = self._resolve(ref, project, ["instances"], "instances")
            self._check_zone_in_region(zone, region, "targetPools.insert")
            links.append(instance["selfLink"])
        item["instances"] = links
        checks = item.get("healthChecks", [])
        if len(checks) > 1:
            raise ApiError(400, "invalid", "a target pool takes at most one health check")
        item["healthChecks"] = [self._resolve(ref, project, ["httpHealthChecks"], "healthChecks")[3]["selfLink"]
                                for ref in checks]

    def _check_regionBackendServices(self, project: str, region: str, item: Json, creating: bool) -> None:
        scheme = item.setdefault("loadBalancingScheme", "EXTERNAL")
        protocol = item.setdefault("protocol", "HTTP")
        if scheme in ("INTERNAL", "EXTERNAL") and protocol not in ("TCP", "UDP", "UNSPECIFIED"):
            raise ApiError(400, "invalid", f"a passthrough backend service cannot use protocol {protocol}")
        checks = item.get("healthChecks", [])
        if len(checks) > 1:
            raise ApiError(400, "invalid", "at most one health check per backend service")
        item["healthChecks"] = [self._resolve(ref, project, ["regionHealthChecks"], "healthChecks")[3]["selfLink"]
                                for ref in checks]
        seen = set()
        for backend in item.get("backends", []):
            _, _, zone, group = self._resolve(backend.get("group", ""), project, ["instanceGroups"], "backends.group")
            self._check_zone_in_region(zone, region, "backend")
            if group["selfLink"] in seen:
                raise ApiError(400, "invalid", f"duplicate backend {group['selfLink']}")
            seen.add(group["selfLink"])
            backend["group"] = group["selfLink"]
        item["fingerprint"] = f"fp-{next(self._ids)}"

    def _check_instanceGroups(self, project: str, zone: str, item: Json, creating: bool) -> None:
        item.setdefault("network", f"{BASE_URL}projects/{project}/global/networks/default")

    def _check_instances(self, project: str, zone: str, item: Json, creating: bool) -> None:
        interfaces = item.setdefault("networkInterfaces", [{}])
        for index, nic in enumerate(interfaces):
            nic.setdefault("network", f"{BASE_URL}projects/{project}/global/networks/default")
            nic.setdefault("name", f"nic{index}")
            nic.setdefault("networkIP", str(ipaddress.IPv4Address("10.128.0.0") + next(self._instance_ips)))
        item["status"] = "RUNNING"

    def _check_forwardingRules(self, project: str, region: str, item: Json, creating: bool) -> None:
        scheme = item.setdefault("loadBalancingScheme", "EXTERNAL")
        protocol = item.setdefault("IPProtocol", "TCP")
        if "portRange" in item and "ports" in item:
            raise ApiError(400, "invalid", "portRange and ports are exclusive")
        if item.get("allPorts") and ("ports" in item or "portRange" in item):
            raise ApiError(400, "invalid", "allPorts excludes ports and portRange")
        if "portRange" in item:
            text = str(item["portRange"])
            if not re.fullmatch(r"\d+(-\d+)?", text):
                raise ApiError(400, "invalid", f"Invalid value for field 'resource.portRange': {text!r}")
            low, high = _port_range(text)
            if not 1 <= low <= high <= 65535:
                raise ApiError(400, "invalid", f"Invalid value for field 'resource.portRange': {text!r}")
            item["portRange"] = f"{low}-{high}"
        if len(item.get("ports", [])) > 5:
            raise ApiError(400, "invalid", "a forwarding rule lists at most 5 ports")
        address: Json | None = None
        given = item.get("IPAddress")
        version = item.get("ipVersion") or "IPV4"
        if given:
            try:
                literal = ipaddress.ip_address(given)
            except ValueError:
                address = self._resolve(given, project, ["addresses"], "IPAddress")[3]
                item["IPAddress"] = address["address"]
            else:
                if (literal.version == 6) != (version == "IPV6"):
                    raise ApiError(400, "invalid", f"IPAddress {given} does not match ipVersion {version}")
                item["IPAddress"] = given = str(literal)
                address = next((a for a in self._all_addresses(project, region) if a.get("address") == given), None)
            if address is not None and (address.get("ipVersion") == "IPV6") != (version == "IPV6"):
                raise ApiError(400, "invalid", f"address {address['name']} does not match ipVersion {version}")
        if version == "IPV6":
            self._check_ipv6_rule(project, region, item, address, given)
            self._check_sharing(project, region, item, address)
            return
        if scheme == "EXTERNAL":
            if "ports" in item and "target" in item:
                raise ApiError(400, "invalid", "ports is only for backend service based forwarding rules")
            if bool(item.get("target")) == bool(item.get("backendService")):
                raise ApiError(400, "invalid", "an external forwarding rule needs exactly one of target and "
                                               "backendService")
            if item.get("target"):
                item["target"] = self._resolve(item["target"], project, ["targetPools"], "target")[3]["selfLink"]
            else:
                service = self._resolve(item["backendService"], project, ["regionBackendServices"],
                                        "backendService")[3]
                item["backendService"] = service["selfLink"]
            tier = item.setdefault("networkTier", "PREMIUM")
            if given and address is None:
                raise ApiError(400, "invalid", f"IP address {given} is not reserved in region {region}")
            if address is not None:
                if address.get("addressType", "EXTERNAL") != "EXTERNAL":
                    raise ApiError(400, "invalid", f"{given} is not an external address")
                if address.get("networkTier", "PREMIUM") != tier:
                    raise ApiError(400, "invalid", f"The network tier of specified IP address is "
                                                   f"{address.get('networkTier', 'PREMIUM')}, but forwarding rule "
                                                   f"is {tier}")
            if not given:
                item["IPAddress"] = str(ipaddress.IPv4Address("35.200.0.0") + next(self._external_ips))
        elif scheme == "INTERNAL":
            if "target" in item or not item.get("backendService"):
                raise ApiError(400, "invalid", "an internal forwarding rule needs backendService and no target")
            if "portRange" in item:
                raise ApiError(400, "invalid", "an internal passthrough forwarding rule takes ports, not portRange")
            if not item.get("allPorts") and not item.get("ports"):
                raise ApiError(400, "required", "an internal forwarding rule needs ports or allPorts")
            service = self._resolve(item["backendService"], project, ["regionBackendServices"], "backendService")[3]
            if service.get("loadBalancingScheme") != "INTERNAL":
                raise ApiError(400, "invalid", "the backend service is not INTERNAL")
            if service.get("protocol") not in (protocol, "UNSPECIFIED"):
                raise ApiError(400, "invalid", f"rule protocol {protocol} does not match the backend service's "
                                               f"{service.get('protocol')}")
            item["backendService"] = service["selfLink"]
            if address is not None and address.get("addressType") != "INTERNAL":
                raise ApiError(400, "invalid", f"{given} is not an internal address")
            if not given:
                item["IPAddress"] = str(ipaddress.IPv4Address("10.128.0.0") + next(self._internal_ips))
        else:
            raise ApiError(400, "invalid", f"the fake does not implement scheme {scheme}")
        self._check_sharing(project, region, item, address)

    def _check_ipv6_rule(self, project: str, region: str, item: Json, address: Json | None, given: str | None) -> None:
        """What GCE allows of IPv6 here: internal, backend service based rules in a subnetwork with
        internal IPv6; target pools carry IPv4 only."""
        if item.get("target"):
            raise ApiError(400, "invalid", "IPv6 forwarding rules cannot point to a target pool: target pools are "
                                           "IPv4 only")
        if item.get("loadBalancingScheme") != "INTERNAL":
            raise ApiError(400, "invalid", "the fake implements IPv6 forwarding rules for scheme INTERNAL only")
        if not item.get("backendService") or "portRange" in item:
            raise ApiError(400, "invalid", "an internal IPv6 forwarding rule needs backendService, not portRange")
        if not item.get("allPorts") and not item.get("ports"):
            raise ApiError(400, "required", "an internal forwarding rule needs ports or allPorts")
        service = self._resolve(item["backendService"], project, ["regionBackendServices"], "backendService")[3]
        if service.get("loadBalancingScheme") != "INTERNAL":
            raise ApiError(400, "invalid", "the backend service is not INTERNAL")
        if service.get("protocol") not in (item["IPProtocol"], "UNSPECIFIED"):
            raise ApiError(400, "invalid", f"rule protocol {item['IPProtocol']} does not match the backend "
                                           f"service's {service.get('protocol')}")
        item["backendService"] = service["selfLink"]
        subnetwork = self._ipv6_subnetwork(project, region, item.get("subnetwork", ""), "forwardingRules.insert")
        item["subnetwork"] = subnetwork["selfLink"]
        if given and address is None:
            raise ApiError(400, "invalid", f"IP address {given} is not reserved in region {region}")
        same_subnetwork = address is not None and (
            self._canon(address.get("subnetwork", "")) == self._canon(subnetwork["selfLink"]))
        if address is not None and (address.get("addressType") != "INTERNAL" or not same_subnetwork):
            raise ApiError(400, "invalid", f"{given} is not an internal IPv6 address of subnetwork "
                                           f"{subnetwork['name']}")
        if not given:
            item["IPAddress"] = self._next_ipv6(subnetwork)

    def _check_sharing(self, project: str, region: str, item: Json, address: Json | None) -> None:
        others = [rule for rule in self._items("forwardingRules", project, region).values()
                  if rule.get("IPAddress") == item["IPAddress"] and rule["name"] != item["name"]]
        if not others:
            return
        if item["loadBalancingScheme"] == "INTERNAL" and (address is None
                                                          or address.get("purpose") != "SHARED_LOADBALANCER_VIP"):
            raise ApiError(400, "invalid", f"IP {item['IPAddress']} is used by another forwarding rule; internal "
                                           "rules share an address only with purpose SHARED_LOADBALANCER_VIP")

        def ports(rule: Json) -> set[int]:
            if rule.get("allPorts") or not (rule.get("ports") or rule.get("portRange")):
                return set(range(1, 65536))
            if rule.get("portRange"):
                low, high = _port_range(rule["portRange"])
                return set(range(low, high + 1))
            return {int(port) for port in rule["ports"]}

        mine = ports(item)
        for other in others:
            if other.get("IPProtocol") == item["IPProtocol"] and mine & ports(other):
                raise ApiError(400, "invalid", f"IP {item['IPAddress']} {item['IPProtocol']} ports overlap with "
                                               f"forwarding rule {other['name']}")

    # -- control endpoint --------------------------------------------------------------------

    def control(self, verb: str, path: str, raw: bytes) -> tuple[int, Json]:
        try:
            body = self._body(raw) or {}
        except ApiError as exc:
            return exc.status, exc.body()
        if verb == "POST" and path == "/_fake/inject":
            try:
                self.inject(str(body["method"]), status=int(body["status"]), reason=body.get("reason"),
                            times=int(body.get("times", 1)), in_operation=bool(body.get("in_operation", False)),
                            message=body.get("message"), after=int(body.get("after", 0)))
            except (KeyError, ValueError) as exc:
                return 400, ApiError(400, "invalid", f"inject needs method and status: {exc}").body()
            return 200, {"ok": True}
        if verb == "GET" and path == "/_fake/calls":
            with self.lock:
                return 200, {"calls": [{"method": c.method, "verb": c.verb, "path": c.path} for c in self.calls]}
        if verb == "POST" and path == "/_fake/reset":
            with self.lock:
                self.calls.clear()
                self._faults.clear()
            return 200, {"ok": True}
        if verb == "GET" and path.startswith("/_fake/resources/") and path.rsplit("/", 1)[-1] in BY_KEY:
            return 200, {"items": self.resources(path.rsplit("/", 1)[-1])}
        return 404, ApiError(404, "notFound", f"no control endpoint {verb} {path}").body()


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], compute: FakeCompute) -> None:
        super().__init__(address, _Handler)
        self.compute = compute


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: don't wait for an ACK between
    server: _HttpServer

    def _serve(self, verb: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        if split.path.startswith("/_fake/"):
            status, payload = self.server.compute.control(verb, split.path, raw)
        else:
            query = parse_qs(split.query, keep_blank_values=True)
            status, payload = self.server.compute.handle(verb, split.path, query, raw)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def log_message(self, format: str, *args: Any) -> None:  # quiet by default
        pass


class GceFakeServer:
    """The fake on a local port: ``with GceFakeServer() as fake: ... fake.url ...``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.compute = FakeCompute()
        self._http = _HttpServer((host, port), self.compute)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> GceFakeServer:
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="gce-fake", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> GceFakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Conveniences for tests.

    def inject(self, method: str, *, status: int, reason: str | None = None, times: int = 1,
               in_operation: bool = False, message: str | None = None, after: int = 0) -> None:
        self.compute.inject(method, status=status, reason=reason, times=times, in_operation=in_operation,
                            message=message, after=after)

    @property
    def calls(self) -> list[Call]:
        with self.compute.lock:
            return list(self.compute.calls)

    def reset_calls(self) -> None:
        with self.compute.lock:
            self.compute.calls.clear()

    def writes(self) -> list[Call]:
        return [call for call in self.calls if call.write]

    def count(self, method: str) -> int:
        return sum(1 for call in self.calls if call.method == method)

    def resources(self, key: str) -> list[Json]:
        return self.compute.resources(key)

    def names(self, key: str) -> list[str]:
        return sorted(item["name"] for item in self.resources(key))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fake Compute Engine REST API for tests")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server = GceFakeServer(args.host, args.port)
    print(server.url, flush=True)
    try:
        server._http.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._http.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
