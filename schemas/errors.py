"""The one error shape every service returns, and its small fixed set of codes (DESIGN.md §3)."""

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
