"""Frames between the node and a python worker over a socketpair: u32 length, u8 kind, body.

Stdlib only: the worker imports this module by path, and its cold start should import nothing else.
"""

import struct

HEADER = struct.Struct("!IB")
# Every call is numbered: an INVOKE's body starts with its number, and the worker's answer to it
# (OUTPUT, HANDLER_ERROR, OUTPUT_TOO_LARGE) starts with the same. A late answer, to a call the
# node gave up on or took a forged answer for, can then never pass for the next call's.
SEQ = struct.Struct("!I")

READY = 1  # worker -> node: handler imported; body = init duration in ms (ascii)
INIT_ERROR = 2  # worker -> node: import failed; body = traceback
INVOKE = 3  # node -> worker: body = the call's SEQ, then the payload
OUTPUT = 4  # worker -> node: body = the handler's output
HANDLER_ERROR = 5  # worker -> node: body = traceback
OUTPUT_TOO_LARGE = 6  # worker -> node: body = the output's size (ascii)
# node -> worker, for a handle(event, context) handler: body = the call's SEQ, the context (one
# line of JSON), a newline, then the payload
INVOKE_WITH_CONTEXT = 7
WANTS_CONTEXT = b" context"  # READY's body ends so when the handler takes (event, context)
# A stem cell (python_worker.py --stem): started before its function is known.
STEM_READY = 8  # worker -> node: the interpreter is up and waits for LOAD; body = empty
# node -> worker, once: body = the function to load (JSON: handler, code_dir, deps_dir,
# max_output, payload), with the function's log as SCM_RIGHTS beside it (its stdout and stderr)
LOAD = 9
MAX_LOAD_FRAME = 16 * 1024
# A template (python_worker.py's last argument "template"): an instance that imported the handler
# and, instead of serving, forks instances of it (python_template.py, docs/architecture.md §4).
# node -> template: body = one line of JSON ({"id": n, "tmp": "/tmp/f<n>"}), a newline, then the
# seccomp filter the fork stacks on its own; beside it (SCM_RIGHTS) the fork's end of its socket
FORK = 10
FORKED = 11  # fork -> node, on its own socket: isolated, waiting; beside it its pidfd
GO = 12  # node -> fork: in its own cgroup now: say READY and serve
FORK_ENDED = 13  # node -> template: body = the fork's id: remove its directory under /tmp
# worker -> node, before an answer (at most one per invocation): the handler's own finished
# OpenTelemetry spans, JSON (worker_spans.py; the node checks them: host_node/handler_spans.py)
SPANS = 14


ANSWERS = frozenset({OUTPUT, HANDLER_ERROR, OUTPUT_TOO_LARGE})  # each starts with its call's SEQ
# What the worker may send once it has its function: READY or INIT_ERROR once, then one answer per
# INVOKE. (A stem cell's STEM_READY is read before, off the bare socket: python_stem.py.)
FROM_WORKER = frozenset({READY, INIT_ERROR, OUTPUT, HANDLER_ERROR, OUTPUT_TOO_LARGE, SPANS})
# A frame other than OUTPUT carries a traceback or a number: the worker sends at most this much
# of a traceback (its end, where the exception is), and the node refuses a larger frame.
MAX_TEXT_FRAME = 64 * 1024


def frame(kind: int, body: bytes) -> bytes:
    return HEADER.pack(len(body), kind) + body
