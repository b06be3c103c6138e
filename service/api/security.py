"""Bearer-token authentication and the loopback-only rule for servers without tokens."""

from __future__ import annotations

import hmac
import ipaddress

from service.config import Settings
from service.errors import AuthError, HPOError

LOCAL_OWNER = "local"


class UnsafeBindError(HPOError, PermissionError):
    status_code = 500
    title = "Unsafe configuration"


def check_bind_allowed(settings: Settings) -> None:
    """With no tokens configured the API is open, so it may only listen on loopback."""
    if settings.token_owners():
        return
    host = settings.host
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise UnsafeBindError(
        f"refusing to bind {host!r} without authentication: set HPO_API_TOKENS (e.g. 'alice:<token>') "
        "or bind 127.0.0.1",
        field="host",
    )


def owner_for(authorization: str | None, settings: Settings) -> str:
    """The owner of a request: the token's owner, or 'local' when auth is off."""
    owners = settings.token_owners()
    if not owners:
        return LOCAL_OWNER
    if not authorization or not authorization.lower().startswith("bearer "):
        raise AuthError(
            "missing bearer token (Authorization: Bearer <token>)", field="Authorization"
        )
    presented = authorization[7:].strip()
    for token, owner in owners.items():  # constant-time compare against each configured token
        if hmac.compare_digest(token.encode(), presented.encode()):
            return owner
    raise AuthError("invalid bearer token", field="Authorization")
