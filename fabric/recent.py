"""Each function's last invocations on this node, for `hetfaas describe`: what ran, when, how it
ended. Bounded twice: PER_FUNCTION invocations of each function, and MAX_FUNCTIONS functions (the
least recently invoked forgotten first), whatever tenants deploy."""

import time
from collections import OrderedDict, deque

from schemas.messages import ErrorReply, InvokeReply, NodeInvoke, RecentInvocation

PER_FUNCTION = 20
MAX_FUNCTIONS = 4096
MAX_MESSAGE = 200  # characters of an error's message kept


class RecentInvocations:
    def __init__(self, node_id: str, per_function: int = PER_FUNCTION, max_functions: int = MAX_FUNCTIONS):
        self.node_id = node_id
        self._per_function = per_function
        self._max_functions = max_functions
        self._of: OrderedDict[tuple[str, str], deque[RecentInvocation]] = OrderedDict()

    def add(self, req: NodeInvoke, reply: InvokeReply | ErrorReply) -> None:
        key = (req.spec.tenant, req.spec.name)
        found = self._of.get(key)
        if found is None:
            found = self._of[key] = deque(maxlen=self._per_function)
            if len(self._of) > self._max_functions:
                self._of.popitem(last=False)
        else:
            self._of.move_to_end(key)
        if isinstance(reply, ErrorReply):
            entry = RecentInvocation(
                invocation_id=req.invocation_id,
                node=self.node_id,
                at=time.time(),
                error=reply.error.code,
                message=reply.error.message[:MAX_MESSAGE],
            )
        else:
            entry = RecentInvocation(
                invocation_id=req.invocation_id,
                node=self.node_id,
                at=time.time(),
                cold_start=reply.cold_start,
                duration_ms=reply.duration_ms,
            )
        found.append(entry)

    def of(self, tenant: str, function: str) -> list[RecentInvocation]:
        """Oldest first."""
        return list(self._of.get((tenant, function), ()))
