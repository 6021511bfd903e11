"""Find providers through the `lbctl.providers` entry points, so third parties can add their own."""

from __future__ import annotations

from importlib.metadata import entry_points

from providers.base import Provider, ProviderSettings

GROUP = "lbctl.providers"


def available() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=GROUP))


def load(name: str, settings: ProviderSettings) -> Provider:
    matches = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not matches:
        raise ValueError(f"unknown provider {name!r}; available: {', '.join(available()) or 'none'}")
    cls = matches[0].load()
    if not (isinstance(cls, type) and issubclass(cls, Provider)):
        raise TypeError(f"entry point {name!r} does not name a Provider subclass")
    return cls.create(settings)
