"""Running the kernel verifier worker (kernel_worker.py) from the async service, with a deadline."""

import asyncio
import sys

import msgspec

from verifier_service.kernel_worker import KernelRequest, KernelResult


async def run_kernel_verifier(request: KernelRequest, timeout_s: float) -> KernelResult:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "verifier_service.kernel_worker",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate(msgspec.msgpack.encode(request))
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return KernelResult(accepted=False, error=f"the kernel verifier took longer than {timeout_s:g} s")
    if proc.returncode != 0:
        return KernelResult(
            accepted=False, error=f"the verifier worker failed: {err.decode(errors='replace')[-500:]}"
        )
    return msgspec.msgpack.decode(out, type=KernelResult)
