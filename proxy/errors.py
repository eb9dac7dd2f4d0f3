"""The one exception tree of tether.

A verdict is a value (`model.Decision`); a failure is one of these.

    TetherError
    ├── ConfigError        a config or rule file is wrong (names file, line, rule, key)
    ├── RequestError       the agent sent something we refuse (status + provider error code)
    │   ├── BadRequest           400: malformed JSON, wrong types
    │   ├── Unauthorized         401: no valid agent identity where auth requires one
    │   ├── PayloadTooLarge      413: body over the configured limit
    │   ├── RouteNotFound        404: no such route
    │   ├── BudgetExceeded       429: a budget is spent or the session was stopped
    │   └── NotGoverned          501: an endpoint that carries tool calls tether cannot yet read
    ├── StoreUnavailable   503: the session store cannot be reached (fail closed)
    └── UpstreamError      502: the upstream answered something we cannot read
        └── ProtocolError        a stream that breaks its own framing or JSON

The core raises these; one middleware in server/ maps them to provider-shaped
HTTP errors. Nothing in the core raises a web framework's exceptions.
"""

from __future__ import annotations


class TetherError(Exception):
    """Base of every error tether raises on purpose."""


class ConfigError(TetherError):
    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        rule_id: str | None = None,
        key: str | None = None,
        column: int | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.column = column  # 1-based, when known (`tether check` prints it)
        self.rule_id = rule_id
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where = f"{where}:{self.line}"
        parts = [where]
        if self.rule_id:
            parts.append(f"rule {self.rule_id}")
        if self.key:
            parts.append(self.key)
        return ": ".join(parts + [self.message])


class RequestError(TetherError):
    status = 400
    code = "invalid_request"
    kind = "invalid_request_error"

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class BadRequest(RequestError):
    status = 400
    code = "invalid_request"


class Unauthorized(RequestError):
    """`reason` is one of a closed set (proxy.auth.verify.Reason): a metric label."""

    status = 401
    code = "unauthenticated"
    kind = "authentication_error"

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


class PayloadTooLarge(RequestError):
    status = 413
    code = "request_too_large"


class RouteNotFound(RequestError):
    status = 404
    code = "unknown_route"
    kind = "not_found_error"


class NotGoverned(RequestError):
    status = 501
    code = "endpoint_not_governed"
    kind = "not_implemented_error"


class BudgetExceeded(RequestError):
    status = 429
    code = "budget_exceeded"
    kind = "rate_limit_error"

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StoreUnavailable(TetherError):
    status = 503
    code = "session_store_unavailable"

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class UpstreamError(TetherError):
    status = 502
    code = "bad_upstream_response"
    kind = "upstream_error"

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class ProtocolError(UpstreamError):
    code = "bad_upstream_stream"
