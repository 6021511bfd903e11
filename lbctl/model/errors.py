"""Errors that carry what a user needs to fix a Service: the field, the problem, the fix."""

from __future__ import annotations


class LoadBalancerError(Exception):
    """Base: `field` names the Service field or annotation at fault (or None), `fix` says what to do."""

    retryable = False
    reason = "SyncLoadBalancerFailed"

    def __init__(self, message: str, *, field: str | None = None, fix: str | None = None) -> None:
        self.problem = message
        self.field = field
        self.fix = fix
        super().__init__(self.describe())

    def describe(self) -> str:
        text = f"{self.field}: {self.problem}" if self.field else self.problem
        return f"{text}; fix: {self.fix}" if self.fix else text


class InvalidServiceError(LoadBalancerError):
    """The Service asks for something that can never work as written; retried only when it changes."""

    condition_reason = "InvalidConfiguration"


class PendingError(LoadBalancerError):
    """Cannot be satisfied now but may be later (pool exhausted, address held): retried with backoff."""

    retryable = True
    condition_reason = "Pending"


class TransientProviderError(LoadBalancerError):
    """The cloud failed in a way worth retrying (throttling, 5xx, quota that may free up)."""

    retryable = True
    condition_reason = "ProviderError"


class NoEligibleNodesError(PendingError):
    reason = "UnAvailableLoadBalancer"
    condition_reason = "NoEligibleNodes"
