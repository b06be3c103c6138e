"""Bearer-token authentication and the loopback-only rule for servers without tokens."""

from __future__ import annotations

import hmac
import ipaddress

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from service.config import Settings
from service.errors import AuthError, HPOError

LOCAL_OWNER = "local"
# Probes (docker, kubernetes) carry no token; they reveal nothing but "alive" / "database up".
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})


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


class BearerAuthMiddleware:
    """With tokens configured, every request except PUBLIC_PATHS needs a valid bearer token:
    also the OpenAPI document, the docs pages and paths that do not exist (401, not 404, so
    nothing can be probed without a token). Routes still learn the owner through ``OwnerDep``."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.enabled = bool(settings.token_owners())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.enabled or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            owner_for(Headers(scope=scope).get("authorization"), self.settings)
        except AuthError as e:
            from service.api.problems import problem

            response = problem(
                e.status_code,
                e.title,
                str(e),
                instance=scope["path"],
                headers={"WWW-Authenticate": "Bearer"},
                field=e.field,
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
