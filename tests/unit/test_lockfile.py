"""requirements-dev.lock (what `.ci/setup` installs) agrees with pyproject.toml: every dependency of
lbctl and of its `dev` extra (with `test`, `aws`, `gce`) is pinned there, at a version its range
allows, with hashes. Changed a dependency? `bash .ci/lock`, and commit both files."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements-dev.lock"


def locked() -> dict[str, tuple[str, str]]:
    """name → (version, the entry's text), from the lock."""
    entries = re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text())
    pins = {}
    for entry in entries:
        match = re.match(r"([A-Za-z0-9._-]+)==([^\s;\\]+)", entry)
        if match:
            pins[canonicalize_name(match.group(1))] = (match.group(2), entry)
    return pins


def wanted() -> list[Requirement]:
    """lbctl's dependencies and those of its dev extra, following lbctl[...] through the extras."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras: dict[str, list[str]] = project["optional-dependencies"]
    found = [Requirement(r) for r in project["dependencies"]]
    todo, seen = ["dev"], set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in extras[extra]:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == "lbctl":
                todo += sorted(requirement.extras)
            else:
                found.append(requirement)
    return found


def test_every_dependency_is_locked_at_a_version_its_range_allows() -> None:
    pins = locked()
    problems = []
    for requirement in wanted():
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None:
            problems.append(f"{requirement} is not in the lock")
        elif not requirement.specifier.contains(pin[0], prereleases=True):
            problems.append(f"{requirement}: the lock has {pin[0]}")
    assert not problems, "requirements-dev.lock is out of date (run `bash .ci/lock`): " + "; ".join(problems)


def test_every_locked_package_is_pinned_with_hashes() -> None:
    pins = locked()
    assert len(pins) > 50  # the whole closure, not only the direct dependencies
    unhashed = [name for name, (_, entry) in pins.items() if "--hash=sha256:" not in entry]
    assert not unhashed, f"locked without a hash: {unhashed}"
    assert "lbctl" not in pins, "lbctl itself is installed from the work tree, not from the lock"
