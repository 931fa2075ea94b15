"""The verifier service process: its key, its connections, and the verify handler."""

import contextlib
import logging
from pathlib import Path

from fabric import bus, health, signing
from fabric.app import ServiceApp, open_bus
from verifier_service import attestation
from verifier_service.kernel import KernelPool
from verifier_service.service import Verifier, ensure_root
from verifier_service.settings import VerifierSettings

log = logging.getLogger(__name__)


class VerifierApp(ServiceApp):
    def __init__(self, settings: VerifierSettings):
        super().__init__()
        self.settings = settings

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        settings = self.settings
        ensure_root()
        key = attestation.load_or_create_key(Path(settings.key_path))
        nc, _tasks = await open_bus(
            stack, "verifier", settings.verifier_id, settings
        )  # no etcd: it keeps no state
        kernel = KernelPool(settings.workers)  # workers started ahead of the first request
        stack.push_async_callback(kernel.close)
        await kernel.start()
        verifier = self.verifier = Verifier(settings, key, kernel)
        server = bus.Server(nc, max_concurrent=64)
        stack.push_async_callback(server.close)
        await server.serve(verifier.routes())
        public = signing.public_key_text(key.public_key())
        health.READINESS.check = lambda: health.unready(nc)
        log.info(
            "verifier %s serving; signing key %s (public %s)", settings.verifier_id, verifier.key_id, public
        )


async def run_verifier(settings: VerifierSettings) -> None:
    await VerifierApp(settings).serve_forever()
