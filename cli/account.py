"""`hetfaas account ...`: the operator's view of the cluster's NATS account, and rotating the
signing key that signs every user, without downtime (NATS's way: an account lists several
signing keys; users signed by any of them are valid).

Rotation is two steps, so nothing stops working in between:
  1. `rotate-signing-key`: a new key signs from now on; the old one still vouches for the users
     it signed. The services' credentials in the state directory are issued again under the new
     key (each service reads its file again when it reconnects). Give tenants new credentials
     (`hetfaas tenant create NAME --out FILE`).
  2. `retire-signing-keys`: the old keys leave the account; users they signed are refused from
     then on, and the servers close their connections (which reconnect with the new files).
"""

from pathlib import Path

import click

from cli.context import state_dir
from cli.output import CommandError, emit, output_option, structured
from cli.tenants import authority_of_cluster, save_and_push
from deploy import authority, launcher
from fabric import credentials


@click.group()
def account() -> None:
    """The cluster's NATS account: its signing keys (the operator's commands)."""


@account.command("show")
@output_option
def account_show(fmt: str) -> None:
    """The account's public key and its signing keys, newest (the one that signs) first."""
    keys = authority_of_cluster()
    shown = {"account": keys.account, "signing_keys": keys.signing_keys, "users": len(keys.issued)}
    if structured():
        emit(shown)
        return
    click.echo(f"account {keys.account}")
    for i, key in enumerate(keys.signing_keys):
        click.echo(
            f"  signing key {key}" + (" (signs new users)" if i == 0 else " (vouches for older users)")
        )


@account.command("rotate-signing-key")
@output_option
def rotate(fmt: str) -> None:
    """Step 1: add a new signing key (to every account); issue the services' credentials again."""
    keys = authority_of_cluster()
    new_key = keys.add_signing_key()
    save_and_push(keys, "the new signing key is kept", all_accounts(keys))
    reissued = reissue_service_creds(keys)
    authority.save(keys, launcher.secrets_dir(state_dir()))
    if structured():
        emit({"signing_key": new_key, "reissued": reissued, "retiring": keys.signing_keys[1:]})
        return
    click.echo(f"new signing key {new_key}; {len(reissued)} service credential(s) issued again under it")
    click.echo(
        "next: give each tenant new credentials (`hetfaas tenant create NAME --out FILE`), "
        "then `hetfaas account retire-signing-keys`"
    )


@account.command("retire-signing-keys")
@output_option
def retire(fmt: str) -> None:
    """Step 2: remove every signing key but the newest; users they signed are refused."""
    keys = authority_of_cluster()
    retired = keys.retire_signing_keys()
    if not retired:
        raise CommandError(
            "bad_request", "the account has one signing key; `hetfaas account rotate-signing-key` adds one"
        )
    save_and_push(keys, "retired", all_accounts(keys))
    if structured():
        emit({"retired": retired, "signing_key": keys.signing_keys[0]})
    else:
        click.echo(f"{len(retired)} signing key(s) retired; users they signed are refused from now on")


def all_accounts(keys: authority.Authority) -> list[str]:
    """HETFAAS first (its new signing key signs the tenants' activations), then every tenant's."""
    return [keys.account_jwt(), *(keys.tenant_account_jwt(tenant) for tenant in keys.tenant_accounts)]


def reissue_service_creds(keys: authority.Authority) -> list[str]:
    """Every credentials file the cluster keeps for its own identities, issued again (same role
    and name) under the newest signing key. Tenants' files live where their operator put them."""
    reissued = []
    for path in sorted((launcher.secrets_dir(state_dir()) / "creds").glob("*.creds")):
        identity = credentials.read_creds(path)
        name = Path(path).stem
        if identity.role in ("operator", "scheduler", "host", "dpu", "verifier"):
            text = keys.issue(identity.role, name)  # type: ignore[arg-type]  # checked just above
        else:  # tests' unrestricted identities
            text = keys.issue_unrestricted(name)
        credentials.write_secret(path, text)
        reissued.append(name)
    return reissued
