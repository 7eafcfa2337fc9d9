"""One small hierarchy for everything that crosses a process boundary."""


class FreshrecError(Exception):
    """Base class of freshrec's own errors."""


class InvalidRecord(FreshrecError):
    """A Kafka record or HTTP payload that fails validation; `reason` is a short metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class VerificationError(FreshrecError):
    """A published version that must not be served; `reason` is a short metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Unavailable(FreshrecError):
    """A backing service (Kafka, Redis) cannot take a write now; retry after `retry_after` s."""

    def __init__(self, detail: str, retry_after: float) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


class LeaseLost(FreshrecError):
    """This publisher does not hold the weight store's publisher lease (it expired and another
    publisher took it, or another publisher holds it): it must not publish."""
