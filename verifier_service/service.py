"""The verifier service's NATS handler: admit, verify, sign."""

import logging
import os
import platform
import secrets
import time
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fabric import bus, metrics, signing, telemetry
from schemas import codec, subjects
from schemas.ebpf import PROG_TYPES, Attestation, VerifyReply, VerifyRequest
from schemas.manifest import NAME_RE
from schemas.messages import ErrorReply, error_reply
from verifier_service import attestation
from verifier_service.admission import FairTurns, TenantBuckets
from verifier_service.kernel import KernelPool
from verifier_service.pipeline import VerifyLimits, verify
from verifier_service.policy import Limits
from verifier_service.settings import VerifierSettings

log = logging.getLogger(__name__)
VERIFIER_VERSION = "hetfaas-verifier/1"


class Verifier:
    def __init__(self, settings: VerifierSettings, key: Ed25519PrivateKey, kernel: KernelPool | None = None):
        self.settings = settings
        self._key = key
        self._kernel = kernel
        self.key_id = signing.key_id(key.public_key())
        self._buckets = TenantBuckets(settings.tenant_rate_per_s, settings.tenant_burst)
        self._turns = FairTurns(settings.workers)
        self._limits = VerifyLimits(
            static=Limits(max_insns=settings.max_insns),
            max_verified_insns=settings.max_verified_insns,
            kernel_timeout_s=settings.kernel_timeout_s,
            kernel_cpu_budget_s=settings.kernel_cpu_budget_s,
            proven_cpu_budget_s=settings.proven_cpu_budget_s,
            modes=tuple(settings.modes),
        )
        self.metrics = VerifierMetrics()

    def routes(self) -> list[bus.Route]:
        traced = bus.Traced("verifier.verify", _verify_attributes, _verified)
        return [
            bus.Route(
                subjects.VERIFY_ALL,
                codec.verify_request,
                self.on_verify,
                subjects.VERIFIER_QUEUE,
                span=traced,
                tenant_reply=True,
            )
        ]

    async def on_verify(self, req: VerifyRequest, ctx: bus.Context) -> VerifyReply | ErrorReply:
        started = time.monotonic()
        reply = await self._verify(req, ctx)
        self.metrics.verdict(reply, time.monotonic() - started)
        return reply

    async def _verify(self, req: VerifyRequest, ctx: bus.Context) -> VerifyReply | ErrorReply:
        """Verify, and sign for the tenant whose subject it came on (NATS let only that tenant,
        or the operator, publish there): never for a tenant named only in the body."""
        asker = subjects.parse_verify(ctx.subject)
        if req.tenant != asker:
            return error_reply(
                "unauthorized", f"credentials of tenant {asker!r} cannot verify for {req.tenant!r}"
            )
        if problem := self._refusal(req):
            return error_reply("bad_request", problem)
        if not self._buckets.take(req.tenant, time.monotonic()):
            message = f"tenant {req.tenant!r} is verifying faster than {self.settings.tenant_rate_per_s:g}/s"
            return error_reply("throttled", message)
        reply = await self._turns.run(
            req.tenant,
            lambda: verify(
                req.object, req.program, req.prog_type, self._limits, kernel=self._kernel, mode=req.mode
            ),
        )
        log.info(
            "verified %s/%s: %s (%s)",
            req.tenant,
            req.function or "-",
            "accepted" if reply.accepted else "rejected",
            reply.mode or "-",
        )
        if reply.accepted and req.function:
            return self.attest(reply, req.tenant, req.function)
        return reply

    def _refusal(self, req: VerifyRequest) -> str | None:
        if not NAME_RE.match(req.tenant) or (req.function and not NAME_RE.match(req.function)):
            return f"invalid tenant or function name {req.tenant!r}/{req.function!r}"
        if len(req.object) > self.settings.max_object_bytes:
            return (
                f"the object is {len(req.object)} bytes, over the limit of {self.settings.max_object_bytes}"
            )
        if req.prog_type not in PROG_TYPES:
            return f"prog_type {req.prog_type!r} is not offered (one of {', '.join(sorted(PROG_TYPES))})"
        return None

    def attest(self, reply: VerifyReply, tenant: str, function: str) -> VerifyReply:
        """The reply, with a signed attestation of what was approved, for `tenant`'s `function`."""
        now = time.time()
        approved = Attestation(
            digest=reply.digest,
            prog_type=reply.prog_type,
            maps=reply.maps,
            helpers=reply.helpers,
            tenant=tenant,
            function=function,
            policy_id=self.settings.policy_id,
            verifier_version=VERIFIER_VERSION,
            kernel_release=platform.release(),
            verified_insns=reply.verified_insns,
            run_ns=reply.run_ns,
            issued_at=now,
            not_after=now + self.settings.attestation_ttl_s,
            serial=secrets.token_hex(8),
            key_id=self.key_id,
            mode="proven" if reply.mode == "proven" else "strict",
            kernel_types=reply.kernel_types,
        )
        return msgspec.structs.replace(reply, signed=attestation.sign(approved, self._key))


class VerifierMetrics:
    """Verdicts (accepted, rejected with the first reason's code, or refused unread with the
    error's code) and how long each took, queueing for a worker included."""

    def __init__(self, registry: metrics.Registry = metrics.REGISTRY):
        self.verdicts = registry.counter(
            "hetfaas.verifier.verdicts",
            "Programs judged, by verdict and reason",
            ("hetfaas.verdict", "hetfaas.reason"),
            unit="{program}",
        )
        self.duration = registry.histogram(
            "hetfaas.verifier.duration", "From a request's arrival to its verdict", ("hetfaas.verdict",)
        )

    def verdict(self, reply: VerifyReply | ErrorReply, took_s: float) -> None:
        reason: str
        if isinstance(reply, ErrorReply):
            verdict, reason = "refused", reply.error.code
        elif reply.accepted:
            verdict, reason = "accepted", ""
        else:
            verdict, reason = "rejected", reply.reasons[0].code if reply.reasons else ""
        self.verdicts.add((verdict, reason))
        self.duration.record((verdict,), took_s)


def ensure_root() -> None:
    if os.geteuid() != 0:
        raise PermissionError("the verifier loads programs into the kernel: it needs root (CAP_BPF)")


def _verify_attributes(req: VerifyRequest) -> dict[str, Any]:
    return {"hetfaas.tenant": req.tenant, "faas.name": req.function, "hetfaas.prog_type": req.prog_type}


def _verified(span: Any, reply: VerifyReply | ErrorReply) -> None:
    telemetry.noted(span, reply)
    if not isinstance(reply, ErrorReply):
        span.set_attribute("hetfaas.accepted", reply.accepted)
        span.set_attribute("hetfaas.verified_insns", reply.verified_insns or 0)
        span.set_attribute("hetfaas.verify_mode", reply.mode)
