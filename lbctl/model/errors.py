"""Errors that carry what a user needs to fix a Service: the field, the problem, the fix."""

from __future__ import annotations

from lbctl.model.waits import Wait, WaitFor


class LoadBalancerError(Exception):
    """Base: `field` names the Service field or annotation at fault (or None), `fix` says what to do."""

    retryable = False
    reason = "SyncLoadBalancerFailed"
    condition_reason = "Failed"

    def __init__(self, message: str, *, field: str | None = None, fix: str | None = None) -> None:
        self.problem = message
        self.field = field
        self.fix = fix
        super().__init__(self.describe())

    def describe(self) -> str:
        text = f"{self.field}: {self.problem}" if self.field else self.problem
        return f"{text}; fix: {self.fix}" if self.fix else text


class InvalidServiceError(LoadBalancerError):
    """The Service asks for something that can never work as written: it needs a user's change (it
    is synced again when it changes, and otherwise retried only every few minutes)."""

    condition_reason = "InvalidConfiguration"


class PendingError(LoadBalancerError):
    """Cannot be satisfied now but may be later (pool exhausted, address held). `wait` says what it
    waits for when the operator can see that change happen (lbctl.model.waits); without one it is
    retried on a timer."""

    retryable = True
    condition_reason = "Pending"
    default_wait: Wait | None = None

    def __init__(self, message: str, *, field: str | None = None, fix: str | None = None,
                 wait: Wait | None = None) -> None:
        super().__init__(message, field=field, fix=fix)
        self.wait = wait if wait is not None else self.default_wait


class TransientProviderError(LoadBalancerError):
    """The cloud failed in a way worth retrying (throttling, 5xx, quota that may free up)."""

    retryable = True
    condition_reason = "ProviderError"


class CloudRefusalError(TransientProviderError):
    """The cloud refused for a reason only a user fixes (a quota, a missing permission): retried,
    since freed resources or a granted role make it pass, but backing off to minutes."""


class NoEligibleNodesError(PendingError):
    reason = "UnAvailableLoadBalancer"
    condition_reason = "NoEligibleNodes"
    default_wait = Wait(WaitFor.NODES)
