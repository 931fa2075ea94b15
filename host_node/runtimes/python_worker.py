"""A warm python instance: import the handler once, then serve invocations one at a time.

Run as `python -I -S python_worker.py FD MODULE:FUNCTION CODE_DIR MAX_OUTPUT_BYTES [bytes|json
[DEPS_DIR|- [instance|template]]]` (a template forks instances rather than serving: forking.py),
or as a stem cell, `python -I -S python_worker.py FD --stem`: started before its
function is known, it says STEM_READY and waits for one LOAD frame naming the function, with the
function's log beside it (SCM_RIGHTS) to become its stdout and stderr. Talks to the node only over
the socket FD; the handler's own stdout/stderr go to the node's log for the function. Stdlib
only, so the worker's own start-up stays small next to the function's imports.

Two handler forms, told apart by the handler's own signature: `handle(payload)` (bytes in), and
`handle(event, context)` as ported from Lambda and OpenFaaS, where `event` is the payload
decoded as JSON when the manifest says `payload = "json"` (bytes otherwise) and `context` says
which invocation this is and how long it has left (Context).
"""

import importlib
import json
import os
import socket
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol

NO_DEPS = "-"  # DEPS_DIR when the function has no layer (an empty argument would end argv)
READ_SIZE = 65536  # under malloc's mmap threshold: a bigger buffer costs page faults per read


def to_bytes(result: object) -> bytes:
    if isinstance(result, bytes | bytearray | memoryview):
        return bytes(result)
    if isinstance(result, str):
        return result.encode()
    if result is None:
        return b""
    return json.dumps(result).encode()


def recv_exact(sock: socket.socket, size: int) -> bytes | None:
    chunks, remaining = [], size
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            return None  # the node closed the socket: time to go
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class Frames:
    """Invocations off the node's socket: a small frame in one recv (the header and payload
    separately would cost the sandboxed worker a second system call per invocation)."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._data = b""  # read past the last frame

    def next_frame(self) -> tuple[int, bytes] | None:
        """The next invocation's (kind, body); None when the node closed the socket."""
        data = self._data
        while len(data) < protocol.HEADER.size:
            more = self._sock.recv(READ_SIZE)
            if not more:
                return None  # the node closed the socket: time to go
            data += more
        size, kind = protocol.HEADER.unpack_from(data)
        end = protocol.HEADER.size + size
        if len(data) < end:
            rest = recv_exact(self._sock, end - len(data))
            if rest is None:
                return None
            data += rest
        self._data = data[end:]
        return kind, data[protocol.HEADER.size : end]


def last_of(text: str) -> bytes:
    """A traceback's end, within what the node takes (the exception's line is last)."""
    data = text.encode(errors="replace")
    return data[-protocol.MAX_TEXT_FRAME :]


class Context:
    """What a handle(event, context) handler learns of its invocation."""

    __slots__ = ("_deadline", "_logger", "cold_start", "function", "invocation_id", "tenant", "traceparent")

    def __init__(self, meta: dict):
        self.invocation_id: str = meta["invocation_id"]
        self.function: str = meta["function"]
        self.tenant: str = meta["tenant"]
        self.cold_start: bool = meta["cold_start"]
        self.traceparent: str = meta.get("traceparent", "")  # W3C, for the handler's own spans
        self._deadline = time.monotonic() + meta["remaining_ms"] / 1000
        self._logger = None

    def remaining_ms(self) -> int:
        """Milliseconds left before the invocation's deadline."""
        return max(0, int((self._deadline - time.monotonic()) * 1000))

    @property
    def logger(self):
        """A logger whose lines go to the function's log (`hetfaas logs`); logging is imported
        only when a handler asks for it (it costs a start a few milliseconds)."""
        if self._logger is None:
            import logging

            logger = logging.getLogger(f"{self.tenant}/{self.function}")
            if not logger.handlers:
                handler = logging.StreamHandler(sys.stderr)
                handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
                logger.addHandler(handler)
                logger.setLevel(logging.INFO)
            self._logger = logger
        return self._logger


def wants_context(handler) -> bool:
    """handle(event, context): two positional parameters (a function's own code says so; any
    other callable is taken as handle(payload))."""
    code = getattr(handler, "__code__", None)
    return code is not None and code.co_argcount - len(getattr(handler, "__defaults__", None) or ()) >= 2


def load_handler(spec: str, code_dir: str, deps_dir: str = ""):
    """The handler, imported from the function's code (its own modules and vendored packages
    first), then the standard library, then its dependency layer, read as a site directory
    (its .pth files too) as site-packages would be."""
    module_name, _, function_name = spec.partition(":")
    sys.path.insert(0, code_dir)
    if deps_dir:
        import site

        site.addsitedir(deps_dir)
    return getattr(importlib.import_module(module_name), function_name)


def receive_load(sock: socket.socket) -> dict | None:
    """A stem cell's LOAD: the function to become (None when the node closed the socket). The
    function's log arrives beside it and becomes stdout and stderr."""
    data, fds, _flags, _address = socket.recv_fds(sock, READ_SIZE, 1)
    for fd in fds:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    while len(data) < protocol.HEADER.size:
        if not (more := sock.recv(READ_SIZE)):
            return None
        data += more
    size, kind = protocol.HEADER.unpack_from(data)
    if kind != protocol.LOAD or size > protocol.MAX_LOAD_FRAME:
        return None  # not the node's protocol: nothing to serve
    end = protocol.HEADER.size + size
    if len(data) < end and (rest := recv_exact(sock, end - len(data))) is not None:
        data += rest
    return json.loads(data[protocol.HEADER.size : end]) if len(data) >= end else None


def handler_spans():
    """What takes the handler's own spans after each call (worker_spans.py), when the handler
    imported OpenTelemetry (and its layer has the SDK); None otherwise, and nothing imported for
    it: a handler without it pays nothing."""
    if "opentelemetry" not in sys.modules:
        return None
    import worker_spans

    return worker_spans.install()


def send_spans(sock: socket.socket, take) -> None:
    """The spans of the call just made, as one SPANS frame within the node's bound (the newest
    dropped to fit)."""
    body = take()
    while len(body) > protocol.MAX_TEXT_FRAME:
        spans = json.loads(body)
        body = json.dumps(spans[: len(spans) // 2], separators=(",", ":")).encode()
    if body:
        sock.sendall(protocol.frame(protocol.SPANS, body))


def serve(sock: socket.socket, handler, max_output: int, as_json: bool = False, spans=None) -> None:
    frames = Frames(sock)
    while True:
        framed = frames.next_frame()
        if framed is None:
            return
        kind, body = framed
        seq, body = body[: protocol.SEQ.size], body[protocol.SEQ.size :]  # the answer says which call
        try:
            if kind == protocol.INVOKE_WITH_CONTEXT:
                meta, _, payload = body.partition(b"\n")
                context = Context(json.loads(meta))
                output = to_bytes(handler(json.loads(payload) if as_json else payload, context))
            else:
                output = to_bytes(handler(body))
        except Exception:
            if spans is not None:
                send_spans(sock, spans)
            sock.sendall(protocol.frame(protocol.HANDLER_ERROR, seq + last_of(traceback.format_exc())))
            continue
        if spans is not None:
            send_spans(sock, spans)
        if len(output) > max_output:
            sock.sendall(protocol.frame(protocol.OUTPUT_TOO_LARGE, seq + str(len(output)).encode()))
        else:
            sock.sendall(protocol.frame(protocol.OUTPUT, seq + output))


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    if sys.argv[2:] == ["--stem"]:
        sock.sendall(protocol.frame(protocol.STEM_READY, b""))
        load = receive_load(sock)
        if load is None:
            return  # retired before it was given a function
        os.chdir(load["code_dir"])
        args = (load["handler"], load["code_dir"], load["deps_dir"], load["max_output"], load["payload"])
        role = load.get("role", "instance")
    else:
        argv = sys.argv + [""] * 3
        deps_dir = "" if argv[6] == NO_DEPS else argv[6]
        args = (argv[2], argv[3], deps_dir, int(argv[4]), argv[5])
        role = argv[7] or "instance"
    become(sock, *args, role=role)


def become(
    sock: socket.socket,
    handler_spec: str,
    code_dir: str,
    deps_dir: str,
    max_output: int,
    payload: str,
    role: str = "instance",
) -> None:
    """Import the handler, say READY (or INIT_ERROR), serve; a template forks instances instead."""
    started = time.perf_counter()
    spans = None
    try:
        handler = load_handler(handler_spec, code_dir, deps_dir)
        spans = handler_spans()
        if not callable(handler):
            raise TypeError(f"{handler_spec} is not callable")
    except BaseException:
        sock.sendall(protocol.frame(protocol.INIT_ERROR, last_of(traceback.format_exc())))
        return
    init_ms = (time.perf_counter() - started) * 1000
    form = protocol.WANTS_CONTEXT if wants_context(handler) else b""
    sock.sendall(protocol.frame(protocol.READY, f"{init_ms:.3f}".encode() + form))
    if role == "template":
        import forking

        def instance(own: socket.socket) -> None:
            own.sendall(protocol.frame(protocol.READY, b"0.000" + form))
            serve(own, handler, max_output, payload == "json", spans)

        forking.serve_template(sock, instance)
        return
    serve(sock, handler, max_output, payload == "json", spans)


if __name__ == "__main__":
    main()
