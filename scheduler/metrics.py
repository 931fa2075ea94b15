"""The scheduler's own invocation metrics: how long invocations wait for their turn, and the errors
it answers itself (the nodes count the invocations they run: fabric/nodes.py InvokeMetrics)."""

from fabric import metrics
from schemas.messages import ErrorReply


class SchedulerMetrics:
    def __init__(self, registry: metrics.Registry = metrics.REGISTRY):
        self.queue_duration = registry.histogram(
            "hetfaas.scheduler.queue_duration",
            "From an invocation's arrival to its admission: its wait for the tenant's limit and its turn",
            ("hetfaas.tenant",),
        )
        self.errors = registry.counter(
            "hetfaas.scheduler.errors",
            "Invocations the scheduler answered with an error itself (bad, unknown, throttled, late)",
            ("error.type",),
            unit="{error}",
        )

    def admitted(self, tenant: str, waited_s: float) -> None:
        self.queue_duration.record((tenant,), waited_s)

    def answered(self, reply: object) -> None:
        if isinstance(reply, ErrorReply):
            self.errors.add((reply.error.code,))
