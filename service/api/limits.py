"""Request body limits, enforced on the bytes actually received.

A declared Content-Length over the limit is refused before anything is read; a body without one
(chunked) or with a false one is counted as it arrives and refused as soon as it passes the
limit, so the server never buffers or spools more than the limit, whatever the client claims.
Uploads (POST /datasets) get ``max_upload_bytes`` plus room for the multipart envelope; every
other request (a job spec is a few KB) gets ``max_request_bytes``.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import defaults
from service.api.problems import problem
from service.config import Settings

UPLOAD_PATH = "/datasets"


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.default_limit = settings.max_request_bytes
        self.upload_limit = settings.max_upload_bytes + defaults.UPLOAD_ENVELOPE_BYTES

    def limit_for(self, scope: Scope) -> tuple[int, str]:
        if scope.get("method") == "POST" and scope.get("path", "").rstrip("/") == UPLOAD_PATH:
            return self.upload_limit, "max_upload_bytes"
        return self.default_limit, "max_request_bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self.limit_for(scope)
        message = f"the request body is larger than the limit of {limit:,} bytes ({setting})"
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = problem(413, "Payload too large", message, instance=scope.get("path"))
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit:
                    # An HTTPException passes FastAPI's body parsing unchanged and is answered
                    # by the problem-details handler (anything else would become a 400).
                    raise HTTPException(413, detail=message)
            return msg

        await self.app(scope, counting_receive, send)
