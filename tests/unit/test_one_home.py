"""One home for each shared fact (issue 13): the names below are spelled out in lbctl's and the
providers' code only where they are defined; everything else imports them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# the literal (as it appears in code, quotes included) → the modules allowed to spell it
HOMES = {
    '"lbctl.io/v1alpha1"': set(),  # lbctl.model.meta.API_VERSION, built from API_GROUP and API_VERSION_NAME
    '"v1alpha1"': {"lbctl/model/meta.py"},
    '"lbctl.io/local"': set(),  # lbctl.model.meta.LOCAL_CLASS, built by default_class
    # an EndpointSlice's label (meta) and the cloud tag/description key of the same name (providers.tags)
    '"kubernetes.io/service-name"': {"lbctl/model/meta.py", "providers/tags.py"},
    '"kubernetes.io/cluster/"': {"providers/tags.py"},
    '"lbctl.io/load-balancer"': {"providers/tags.py"},
    '"kubernetes.io/role/elb"': {"providers/aws_plan.py"},
    '"service.kubernetes.io/load-balancer-cleanup"': {"lbctl/model/meta.py"},
    '"%Y-%m-%dT%H:%M:%SZ"': {"lbctl/model/meta.py"},
}


def sources() -> dict[str, str]:
    return {str(p.relative_to(REPO)): p.read_text() for d in ("lbctl", "providers") for p in (REPO / d).rglob("*.py")}


@pytest.mark.parametrize("literal", sorted(HOMES))
def test_each_shared_name_is_spelled_only_in_its_home(literal: str) -> None:
    found = {path for path, text in sources().items() if literal in text}
    assert found <= HOMES[literal], f"{literal} spelled out in {sorted(found - HOMES[literal])}: import it instead"


def test_one_key_helper_and_one_clock() -> None:
    """"namespace/name" and now() come from lbctl.model.meta (report, lab and operator alike)."""
    again = {path for path, text in sources().items() if path != "lbctl/model/meta.py"
             and re.search(r"^def (_?now\(|key_of\(|_?key\(namespace)", text, re.MULTILINE)}
    assert again == set()
