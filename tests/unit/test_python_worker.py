"""The python worker's reading of invocations off its socket (a real socketpair)."""

import socket
import threading

from host_node.runtimes import protocol
from host_node.runtimes.python_worker import Frames


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
    assert frames.next_payload() == b"hi"
    sender.join()
    assert frames.next_payload() == b""
    sender = threading.Thread(target=lambda: node.sendall(protocol.frame(protocol.INVOKE, large)))
    sender.start()
    assert frames.next_payload() == large
    sender.join()
    node.close()
    assert frames.next_payload() is None
    worker.close()
