"""Concurrency limits per function and per tenant, counted by this replica. Pure.

The limits themselves are cluster-wide; each replica enforces its share of them (shares.py).
"""

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TypeVar

K = TypeVar("K", bound=Hashable)

FunctionKey = tuple[str, str]  # (tenant, function)


@dataclass(frozen=True)
class Blocked:
    """Why an invocation may not start now: the limit it is waiting on."""

    scope: str  # "function" | "tenant"
    name: str
    limit: int

    def describe(self) -> str:
        what = f"function {self.name}" if self.scope == "function" else f"tenant {self.name!r}"
        return f"{what} is at its concurrency limit ({self.limit} on this scheduler replica)"


@dataclass
class Running:
    # Plain dicts, not Counters: these change twice per invocation (Counter's methods are Python).
    functions: dict[FunctionKey, int] = field(default_factory=dict)
    tenants: dict[str, int] = field(default_factory=dict)

    def blocked(self, fn: FunctionKey, fn_limit: int | None, tenant_limit: int) -> Blocked | None:
        """The first limit that stops `fn` from starting now (None: it may start)."""
        if fn_limit is not None and self.functions.get(fn, 0) >= fn_limit:
            return Blocked("function", f"{fn[0]}/{fn[1]}", fn_limit)
        if self.tenants.get(fn[0], 0) >= tenant_limit:
            return Blocked("tenant", fn[0], tenant_limit)
        return None

    def enter(self, fn: FunctionKey) -> None:
        increment(self.functions, fn)
        increment(self.tenants, fn[0])

    def leave(self, fn: FunctionKey) -> None:
        decrement(self.functions, fn)
        decrement(self.tenants, fn[0])

    @property
    def total(self) -> int:
        return sum(self.tenants.values())


def increment(counts: dict[K, int], key: K) -> None:
    counts[key] = counts.get(key, 0) + 1


def decrement(counts: dict[K, int], key: K) -> None:
    """One less; the key goes when none are left (the dicts stay as small as what runs)."""
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
