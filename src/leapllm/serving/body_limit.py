"""`--max-request-bytes`: a request body over the limit is a 413 before it is read whole.

Plain ASGI, like the API-key check: a declared Content-Length over the limit is answered at once,
and a chunked body is counted as it arrives and cut off when it passes the limit.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from leapllm.config import ServerSettings
from leapllm.serving.errors import ApiError, error_body

DEFAULT_MAX_REQUEST_BYTES = ServerSettings().max_request_bytes


def too_large(max_bytes: int) -> str:
    return f"the request body is larger than {max_bytes} bytes (the server's --max-request-bytes)"


class BodyTooLargeError(HTTPException):
    """Raised while FastAPI reads the body; an HTTPException, which its body parsing passes on
    (anything else would become a 400), and the app's handler answers as OpenAI's error JSON."""

    def __init__(self, max_bytes: int):
        super().__init__(413, too_large(max_bytes))


class BodySizeLimitMiddleware:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            err = ApiError(413, too_large(self.max_bytes))
            await JSONResponse(error_body(err), status_code=413)(scope, receive, send)
            return
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
            return message

        await self.app(scope, counted_receive, send)
