"""`--api-key`: the API key a client must send, as `Authorization: Bearer <key>`, on /v1/* and on
the dashboard's data (/metrics.json, /reports)."""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse

from leapllm.serving.errors import ApiError, error_body


def needs_key(path: str) -> bool:
    """The API and the dashboard's data. /health and /metrics stay open (probes, scrapers), and so do
    the web pages and their static files, which hold no data and ask the user for the key."""
    return path.startswith("/v1") or path == "/metrics.json" or path == "/reports" or path.startswith("/reports/")


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <key>` where needs_key says.

    Plain ASGI, so that it answers before the body is read and never wraps streaming responses."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and needs_key(scope["path"]) and scope["method"] != "OPTIONS":
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
