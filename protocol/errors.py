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
