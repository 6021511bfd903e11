"""Kubernetes label selectors (metav1.LabelSelector) as plain data (pure): parsing with the field
at fault named, and matching."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


class SelectorError(ValueError):
    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # In, NotIn, Exists, DoesNotExist
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return labels.get(self.key) in self.values
        if self.operator == "NotIn":
            return labels.get(self.key) not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels


@dataclass(frozen=True)
class LabelSelector:
    """Every term must hold; an empty selector matches everything (as in Kubernetes)."""

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels) and all(
            r.matches(labels) for r in self.match_expressions)


EVERYTHING = LabelSelector()


def parse_selector(value: Any, where: str) -> LabelSelector:
    """A LabelSelector from its API form; None or {} selects everything."""
    if value is None:
        return EVERYTHING
    if not isinstance(value, Mapping):
        raise SelectorError(where, "must be an object with matchLabels and/or matchExpressions")
    labels = value.get("matchLabels") or {}
    if not isinstance(labels, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise SelectorError(f"{where}.matchLabels", "must map label names to string values")
    expressions = value.get("matchExpressions") or []
    if not isinstance(expressions, list):
        raise SelectorError(f"{where}.matchExpressions", "must be a list")
    requirements = []
    for i, expr in enumerate(expressions):
        at = f"{where}.matchExpressions[{i}]"
        if not isinstance(expr, Mapping) or not isinstance(expr.get("key"), str) or not expr.get("key"):
            raise SelectorError(f"{at}.key", "a non-empty label name is required")
        operator = expr.get("operator")
        values = expr.get("values") or []
        if operator not in OPERATORS:
            raise SelectorError(f"{at}.operator", f"{operator!r} is not In, NotIn, Exists or DoesNotExist")
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise SelectorError(f"{at}.values", "must be a list of strings")
        if operator in ("In", "NotIn") and not values:
            raise SelectorError(f"{at}.values", f"{operator} needs at least one value")
        if operator in ("Exists", "DoesNotExist") and values:
            raise SelectorError(f"{at}.values", f"{operator} takes no values")
        requirements.append(Requirement(expr["key"], operator, frozenset(values)))
    return LabelSelector(tuple(sorted(labels.items())), tuple(requirements))
