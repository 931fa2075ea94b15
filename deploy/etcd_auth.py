"""etcd's users and roles for a cluster: one etcd user per service identity, each holding one role
with exactly the keys `schemas.permissions.etcd_grants` names; root is the operator's.

Done over etcd's JSON gateway (`/v3/auth/...`), which is synchronous and needs nothing but the
standard library, so the launcher can call it from anywhere (including from tests already
running an event loop). Passwords are 256-bit random: they are never guessed, so etcd may hash
them at bcrypt's lowest cost (`--bcrypt-cost 4`): a login and one call through the gateway take
5 ms instead of 71 at the default cost (median of 20).
"""

import base64
import http.client
import json
import secrets
import ssl
import urllib.error
import urllib.request
from pathlib import Path

from deploy.services import ServiceError
from fabric import credentials
from fabric.credentials import EtcdLogin
from schemas.permissions import KeyGrant, Role, etcd_grants

ROOT = "root"
AUTH_NOT_ENABLED = "authentication is not enabled"
ALREADY_EXISTS = "already exists"


class EtcdAuthError(ServiceError):
    """etcd refused an auth call (the message is etcd's own, which never holds a password)."""


def user_name(role: Role, name: str) -> str:
    """The etcd user (and role) of identity `name` in `role`: `scheduler.scheduler-0`."""
    return f"{role}.{name}"


def new_login(user: str) -> EtcdLogin:
    return EtcdLogin(user, secrets.token_urlsafe(32))


def range_end(key: str) -> str:
    """The end of the range of every key starting with `key` (etcd's "prefix")."""
    raw = key.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode()


class EtcdAdmin:
    """Root's side of etcd's auth API on one endpoint (`host:port`)."""

    def __init__(
        self, endpoint: str, root: EtcdLogin, ca: str = "", timeout_s: float = 5.0, client_cert: str = ""
    ):
        self._base = f"{'https' if ca else 'http'}://{endpoint}/v3"
        self._context = ssl.create_default_context(cafile=ca) if ca else None
        if self._context is not None and client_cert:  # one PEM file: certificate and key
            self._context.load_cert_chain(client_cert)
        self._root = root
        self._timeout_s = timeout_s
        self._token = ""

    def _call(self, path: str, body: dict, token: str = "") -> dict:
        request = urllib.request.Request(
            f"{self._base}/{path}", data=json.dumps(body).encode(), method="POST"
        )
        if token:
            request.add_header("Authorization", token)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout_s, context=self._context) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("message", str(exc))
            except (ValueError, OSError):
                message = str(exc)
            raise EtcdAuthError(message.removeprefix("etcdserver: ")) from None
        except (OSError, http.client.HTTPException) as exc:
            raise EtcdAuthError(f"etcd at {self._base} unreachable: {exc}") from None

    def _as_root(self, path: str, body: dict) -> dict:
        if not self._token:
            self._token = self._call(
                "auth/authenticate", {"name": self._root.user, "password": self._root.password}
            )["token"]
        return self._call(path, body, self._token)

    def secure(self) -> None:
        """Turn auth on with `root` as its root user, unless it is on already (then root's login
        must work: a cluster's etcd answers only to the root that set it up)."""
        try:
            self._as_root("auth/status", {})
            return
        except EtcdAuthError as exc:
            if AUTH_NOT_ENABLED not in str(exc):
                raise EtcdAuthError(f"etcd refused its root ({self._root.user}): {exc}") from None
        self._ignore_existing(lambda: self._call("auth/user/add", self._user_body(self._root)))
        self._call("auth/user/grant", {"user": self._root.user, "role": ROOT})
        self._call("auth/enable", {})

    def ensure_user(self, login: EtcdLogin, grants: tuple[KeyGrant, ...]) -> None:
        """User `login.user` with that password and one role of the same name holding `grants`
        (idempotent: a restarted cluster re-asserts what its identities may do)."""
        user = login.user
        self._ignore_existing(lambda: self._as_root("auth/user/add", self._user_body(login)))
        self._as_root("auth/user/changepw", {"name": user, "password": login.password})
        self._ignore_existing(lambda: self._as_root("auth/role/add", {"name": user}))
        for grant in grants:
            perm = {"permType": "READWRITE" if grant.write else "READ", "key": _b64(grant.key)}
            if grant.prefix:
                perm["range_end"] = _b64(range_end(grant.key))
            self._as_root("auth/role/grant", {"name": user, "perm": perm})
        if grants:
            self._as_root("auth/user/grant", {"user": user, "role": user})

    @staticmethod
    def _user_body(login: EtcdLogin) -> dict:
        return {"name": login.user, "password": login.password}

    @staticmethod
    def _ignore_existing(call) -> None:
        try:
            call()
        except EtcdAuthError as exc:
            if ALREADY_EXISTS not in str(exc):
                raise


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def login_file(directory: Path, user: str) -> Path:
    return directory / f"{user}.etcd"


def load_or_create_login(directory: Path, user: str) -> tuple[Path, EtcdLogin]:
    """The login kept for `user` (0600), created on first use."""
    path = login_file(directory, user)
    if path.exists():
        return path, credentials.read_etcd_login(path)
    login = new_login(user)
    credentials.write_secret(path, credentials.etcd_login_text(login))
    return path, login


def issue(admin: EtcdAdmin, directory: Path, role: Role, name: str) -> Path:
    """The etcd login file of identity `name` in `role`, its user and role asserted in etcd."""
    path, login = load_or_create_login(directory, user_name(role, name))
    admin.ensure_user(login, etcd_grants(role, name))
    return path
