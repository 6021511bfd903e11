"""The reflector's re-list diff (lbctl.kube.reflector.relist_changes): a re-list is the truth, and
what it no longer holds is reported deleted, as a DELETED event would have."""

from __future__ import annotations

from typing import Any

import pytest

from lbctl.kube.reflector import relist_changes


def obj(name: str, version: str, namespace: str = "ns") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": version}}


def cache(*objects: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{o['metadata']['namespace']}/{o['metadata']['name']}": o for o in objects}


def summary(changes: list[tuple[Any, Any]]) -> list[tuple[str | None, str | None]]:
    def describe(o: Any) -> str | None:
        return None if o is None else f"{o['metadata']['name']}@{o['metadata']['resourceVersion']}"

    return [(describe(old), describe(new)) for old, new in changes]


@pytest.mark.parametrize(("old", "fresh", "expected"), [
    pytest.param(cache(), cache(obj("a", "1")), [(None, "a@1")], id="first-list-adds-everything"),
    pytest.param(cache(obj("a", "1")), cache(obj("a", "1")), [], id="unchanged-reports-nothing"),
    pytest.param(cache(obj("a", "1")), cache(obj("a", "5")), [("a@1", "a@5")], id="changed-in-the-gap"),
    pytest.param(cache(obj("a", "1"), obj("b", "2")), cache(obj("b", "2")), [("a@1", None)],
                 id="vanished-in-the-gap-is-deleted"),
    pytest.param(cache(obj("a", "1")), cache(), [("a@1", None)], id="empty-list-deletes-all"),
    pytest.param(cache(obj("a", "1"), obj("b", "2")), cache(obj("b", "3"), obj("c", "4")),
                 [("a@1", None), ("b@2", "b@3"), (None, "c@4")], id="deletions-first-then-changes"),
    pytest.param(cache(obj("a", "1", "x")), cache(obj("a", "1", "y")), [("a@1", None), (None, "a@1")],
                 id="same-name-other-namespace-is-another-object"),
])
def test_relist_changes(old: dict[str, dict[str, Any]], fresh: dict[str, dict[str, Any]],
                        expected: list[tuple[str | None, str | None]]) -> None:
    assert summary(relist_changes(old, fresh)) == expected
