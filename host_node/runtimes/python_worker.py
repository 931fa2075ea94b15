"""A warm python instance: import the handler once, then serve invocations one at a time.

Run as `python -I python_worker.py FD MODULE:FUNCTION CODE_DIR MAX_OUTPUT_BYTES`. Talks to the node
only over the socket FD; the handler's own stdout/stderr go to the node's log for the function.
Stdlib only, so the worker's own start-up stays small next to the function's imports.
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

    def next_payload(self) -> bytes | None:
        """The next invocation's payload; None when the node closed the socket."""
        data = self._data
        while len(data) < protocol.HEADER.size:
            more = self._sock.recv(READ_SIZE)
            if not more:
                return None  # the node closed the socket: time to go
            data += more
        size, _kind = protocol.HEADER.unpack_from(data)
        end = protocol.HEADER.size + size
        if len(data) < end:
            rest = recv_exact(self._sock, end - len(data))
            if rest is None:
                return None
            data += rest
        self._data = data[end:]
        return data[protocol.HEADER.size : end]


def last_of(text: str) -> bytes:
    """A traceback's end, within what the node takes (the exception's line is last)."""
    data = text.encode(errors="replace")
    return data[-protocol.MAX_TEXT_FRAME :]


def load_handler(spec: str, code_dir: str):
    module_name, _, function_name = spec.partition(":")
    sys.path.insert(0, code_dir)
    return getattr(importlib.import_module(module_name), function_name)


def serve(sock: socket.socket, handler, max_output: int) -> None:
    frames = Frames(sock)
    while True:
        payload = frames.next_payload()
        if payload is None:
            return
        try:
            output = to_bytes(handler(payload))
        except Exception:
            sock.sendall(protocol.frame(protocol.HANDLER_ERROR, last_of(traceback.format_exc())))
            continue
        if len(output) > max_output:
            sock.sendall(protocol.frame(protocol.OUTPUT_TOO_LARGE, str(len(output)).encode()))
        else:
            sock.sendall(protocol.frame(protocol.OUTPUT, output))


def main() -> None:
    fd, handler_spec, code_dir, max_output = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    sock = socket.socket(fileno=int(fd))
    started = time.perf_counter()
    try:
        handler = load_handler(handler_spec, code_dir)
        if not callable(handler):
            raise TypeError(f"{handler_spec} is not callable")
    except BaseException:
        sock.sendall(protocol.frame(protocol.INIT_ERROR, last_of(traceback.format_exc())))
        return
    init_ms = (time.perf_counter() - started) * 1000
    sock.sendall(protocol.frame(protocol.READY, f"{init_ms:.3f}".encode()))
    serve(sock, handler, max_output)


if __name__ == "__main__":
    main()
