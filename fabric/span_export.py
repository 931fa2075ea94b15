"""Where finished spans go: queued, encoded in batches as OTLP (JSON, or protobuf for a
collector that asks for it), and written off the event loop, to a file or over OTLP/HTTP."""

import logging
import os
import threading
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

from fabric import otlp, otlp_proto
from fabric.tracing import Span

log = logging.getLogger(__name__)
JSON, PROTOBUF = "json", "protobuf"


class BatchExporter:
    """Finished spans queue here and leave in batches (OTEL_BSP_*) as OTLP/JSON.

    A full batch is encoded by the thread that finished its last span, the service's event
    loop: handing spans to another thread to encode cost the scheduler ~5 µs more per span
    (the GIL passed back and forth) than encoding them itself. The background thread writes the
    encoded batches (a file append or an HTTP POST, which must not block the loop) and, every
    OTEL_BSP_SCHEDULE_DELAY, encodes and writes what a quiet service left short of a batch."""

    def __init__(
        self,
        service: str,
        write: Callable[[bytes], None],
        environ: Mapping[str, str] = os.environ,
        protocol: str = JSON,
    ):
        resource = otlp.resource_attributes(service, environ)
        self._encode: Callable[[list[Span]], bytes] = (
            partial(otlp_proto.encode_spans, resource)
            if protocol == PROTOBUF
            else partial(otlp.encode, resource)
        )
        self._write = write
        # 1 s rather than OpenTelemetry's 5 s: `hetfaas invoke --trace` waits for the spans
        self._delay_s = int(environ.get("OTEL_BSP_SCHEDULE_DELAY", "1000")) / 1000
        self._max_queue = int(environ.get("OTEL_BSP_MAX_QUEUE_SIZE", "2048"))
        self._batch = max(1, int(environ.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "512")))
        self._spans: deque[Span] = deque()
        self._bodies: deque[tuple[int, bytes]] = deque()  # (spans in it, encoded batch) to write
        self._wake = threading.Event()
        self._stopping = False
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name=f"span-export-{service}", daemon=True)
        self._thread.start()

    def add(self, span: Span) -> None:
        queued = len(self._spans)
        if queued >= self._max_queue:
            self.dropped += 1  # a slow backend must not grow the process without bound
            return
        self._spans.append(span)
        if queued + 1 >= self._batch:
            self._encode_batch()

    def _encode_batch(self) -> None:
        """Encode up to a batch of queued spans (here or on the background thread: deque
        operations are atomic, so each span goes in exactly one batch)."""
        batch: list[Span] = []
        try:
            while len(batch) < self._batch:
                batch.append(self._spans.popleft())
        except IndexError:
            pass
        if not batch:
            return
        if (len(self._bodies) + 1) * self._batch > max(self._max_queue, self._batch):
            self.dropped += len(batch)  # the writer is behind: bounded, like the span queue
            return
        try:
            self._bodies.append((len(batch), self._encode(batch)))
        except Exception as exc:  # a span that cannot be encoded costs its batch, not the service
            log.warning("could not encode %d spans: %s", len(batch), exc)
            return
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._delay_s)
            self._wake.clear()
            self._export_all()
        self._export_all()

    def _export_all(self) -> None:
        while self._spans:
            self._encode_batch()
        while self._bodies:
            count, body = self._bodies.popleft()
            try:
                self._write(body)
            except Exception as exc:  # backend down, disk full: the spans are lost, the service is not
                log.warning("could not export %d spans: %s", count, exc)

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)


def file_writer(path: Path) -> Callable[[bytes], None]:
    """OTLP-JSON lines: one ExportTraceServiceRequest per line, appended."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(body: bytes) -> None:
        with open(path, "ab") as out:
            out.write(body + b"\n")

    return write


def protocol_of(signal: str, environ: Mapping[str, str] = os.environ) -> str:
    """OTEL_EXPORTER_OTLP_<SIGNAL>_PROTOCOL or OTEL_EXPORTER_OTLP_PROTOCOL: `http/protobuf` (the
    default, as the collector's) or `http/json`; `grpc` is not spoken here."""
    value = (
        environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if value == "http/json":
        return JSON
    if value != "http/protobuf":
        log.warning("OTLP protocol %r is not supported: exporting %s as http/protobuf", value, signal)
    return PROTOBUF


def http_writer(signal: str = "traces", environ: Mapping[str, str] = os.environ) -> Callable[[bytes], None]:
    """OTLP/HTTP to OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT +
    /v1/<signal>, in the protocol's encoding (`protocol_of`), with OTEL_EXPORTER_OTLP_HEADERS
    (and OTEL_EXPORTER_OTLP_<SIGNAL>_HEADERS)."""
    url = environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT") or (
        environ["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + f"/v1/{signal}"
    )
    content_type = (
        "application/x-protobuf" if protocol_of(signal, environ) == PROTOBUF else "application/json"
    )
    headers = {"Content-Type": content_type}
    for variable in ("OTEL_EXPORTER_OTLP_HEADERS", f"OTEL_EXPORTER_OTLP_{signal.upper()}_HEADERS"):
        for pair in filter(None, environ.get(variable, "").split(",")):
            key, _, value = pair.partition("=")
            headers[urllib.parse.unquote(key.strip())] = urllib.parse.unquote(value.strip())
    timeout_s = int(environ.get("OTEL_EXPORTER_OTLP_TIMEOUT", "10000")) / 1000

    def write(body: bytes) -> None:
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()

    return write
