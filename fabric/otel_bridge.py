"""Our trace context joined to the OpenTelemetry API's, for user code in the same process.

A program that uses the client library (cli/client.py) with OpenTelemetry of its own expects
`client.invoke` inside its span to be that span's child. Our tracer is not the API's (it is
measured faster, fabric/tracing.py), so the API's current context is read as a caller's
headers would be, through the API's own propagators (OTEL_PROPAGATORS). Nothing is imported
for a program that does not use the API itself. (A handler's side: runtimes/worker_spans.py.)
"""

import logging
import sys

log = logging.getLogger(__name__)


def api_context() -> dict[str, str] | None:
    """The OpenTelemetry API's current span (and baggage) as `traceparent` headers, or None when
    the process does not use the API or no valid span is current."""
    if "opentelemetry.trace" not in sys.modules:
        return None
    try:
        from opentelemetry import propagate  # type: ignore[attr-defined]  # the user's, when installed

        carrier: dict[str, str] = {}
        propagate.inject(carrier)
    except Exception as exc:  # a broken installation of the user's must not fail the call
        log.debug("the OpenTelemetry API's context could not be read: %s", exc)
        return None
    return carrier if "traceparent" in carrier else None
