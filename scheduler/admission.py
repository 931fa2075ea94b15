"""Concurrency limits per function and per tenant, counted by this replica. Pure.

The limits themselves are cluster-wide; each replica enforces its share of them (shares.py).
"""

from collections import Counter
from dataclasses import dataclass, field

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
    functions: Counter[FunctionKey] = field(default_factory=Counter)
    tenants: Counter[str] = field(default_factory=Counter)

    def blocked(self, fn: FunctionKey, fn_limit: int | None, tenant_limit: int) -> Blocked | None:
        """The first limit that stops `fn` from starting now (None: it may start)."""
        if fn_limit is not None and self.functions[fn] >= fn_limit:
            return Blocked("function", f"{fn[0]}/{fn[1]}", fn_limit)
        if self.tenants[fn[0]] >= tenant_limit:
            return Blocked("tenant", fn[0], tenant_limit)
        return None

    def enter(self, fn: FunctionKey) -> None:
        self.functions[fn] += 1
        self.tenants[fn[0]] += 1

    def leave(self, fn: FunctionKey) -> None:
        for counter, key in ((self.functions, fn), (self.tenants, fn[0])):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]  # type: ignore[attr-defined]

    @property
    def total(self) -> int:
        return sum(self.tenants.values())
