"""`--api-key`: the API key a client must send, as `Authorization: Bearer <key>`, on /v1/*."""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse

from leapllm.serving.errors import ApiError, error_body


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on /v1/*; /health and /metrics stay open (probes, scrapers).

    Plain ASGI, so that it answers before the body is read and never wraps streaming responses."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not token.strip():
                err = ApiError(401, "missing API key: send it as 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
            elif not hmac.compare_digest(token.strip(), self.api_key):  # constant time: no timing oracle
                err = ApiError(401, "incorrect API key provided", code="invalid_api_key")
            else:
                err = None
            if err is not None:
                response = JSONResponse(error_body(err), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
