"""The one error shape every service returns, and its small fixed set of codes (docs/architecture.md §3)."""

from typing import Literal

import msgspec

ErrorCode = Literal[
    "bad_request",
    "not_found",
    "unauthorized",
    "throttled",
    "timeout",
    "unavailable",
    "rejected",
    "function_error",
    "internal",
]


class Error(msgspec.Struct, frozen=True, kw_only=True):
    """A structured error: `code` is for programs, `message` for people, `detail` for debugging."""

    code: ErrorCode
    message: str
    detail: str | None = None


# Refusals that say "not here, not now" (nothing ran): the scheduler retries them on another node,
# and a node forgets them at once, so a later copy of the invocation may run.
RETRIED_ELSEWHERE: frozenset[ErrorCode] = frozenset({"throttled", "unavailable"})
