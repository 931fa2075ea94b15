"""The python worker's reading of invocations off its socket (a real socketpair)."""

import socket
import threading

from host_node.runtimes import protocol
from host_node.runtimes.python_worker import Context, Frames, wants_context


def test_frames_come_whole_however_they_are_read_and_a_closed_socket_ends_the_worker() -> None:
    node, worker = socket.socketpair()
    frames = Frames(worker)
    large = bytes(range(256)) * 12_000  # 3 MB: many reads
    sender = threading.Thread(
        target=lambda: node.sendall(
            protocol.frame(protocol.INVOKE, b"hi") + protocol.frame(protocol.INVOKE, b"")
        )
    )
    sender.start()
    assert frames.next_frame() == (protocol.INVOKE, b"hi")
    sender.join()
    assert frames.next_frame() == (protocol.INVOKE, b"")
    sender = threading.Thread(target=lambda: node.sendall(protocol.frame(protocol.INVOKE, large)))
    sender.start()
    assert frames.next_frame() == (protocol.INVOKE, large)
    sender.join()
    node.close()
    assert frames.next_frame() is None
    worker.close()


def test_the_handlers_own_signature_chooses_its_form() -> None:
    def plain(payload):
        return payload

    def lambda_style(event, context):
        return event

    def defaulted(payload, options=None):
        return payload

    assert [wants_context(h) for h in (plain, lambda_style, defaulted, print)] == [False, True, False, False]


def test_a_context_says_which_invocation_and_how_long_it_has() -> None:
    meta = {
        "invocation_id": "inv-1",
        "function": "f",
        "tenant": "t",
        "cold_start": True,
        "remaining_ms": 60_000,
    }
    context = Context(meta)
    assert (context.invocation_id, context.function, context.tenant, context.cold_start) == (
        "inv-1",
        "f",
        "t",
        True,
    )
    assert 59_000 < context.remaining_ms() <= 60_000 and context.traceparent == ""
    assert context.logger.name == "t/f"
