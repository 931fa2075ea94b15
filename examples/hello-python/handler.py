"""Greets whoever the payload names; returns a JSON-able dict, which hetfaas sends as JSON."""

import time
import uuid

STARTED = time.time()  # module-level work runs once per instance: the cold start
INSTANCE = uuid.uuid4().hex[:8]  # tells warm instances apart (each is pid 1 in its own sandbox)


def handle(payload: bytes) -> dict:
    name = payload.decode().strip() or "world"
    age_s = round(time.time() - STARTED, 3)
    return {"greeting": f"hello, {name}!", "instance": INSTANCE, "instance_age_s": age_s}
