"""The drivers' error taxonomy: the class of an error decides what the caller does next.

Drivers never retry on their own: they raise one of these and the supervisor (channels)
or the outbox (sends) decides. `router.drivers` re-exports them.
"""

from __future__ import annotations


class DriverError(Exception):
    """Base of the error taxonomy; the class decides what the caller does next."""


class TransientError(DriverError):
    """Back off and retry (connection refused, 5xx, broker gone)."""


class TimedOut(TransientError):
    """The peer did not answer in time; retry soon."""


class RateLimited(TransientError):
    """The peer asked us to slow down; obey its hint."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(DriverError):
    """Retrying cannot help (4xx, rejected recipient): dead-letter at once."""


class AuthFailed(PermanentError):
    """Credentials were refused: park the driver as bad_credentials and alert."""
