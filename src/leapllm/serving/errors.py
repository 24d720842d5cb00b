"""OpenAI-shaped errors: every failure a request can end with, as its HTTP status and JSON body.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

Handlers raise ApiError for what they refuse themselves; as_api_error maps everything else (the
engine's overload, shutdown and step errors, LeapLLMError, bugs) to a status and the same fields,
and validation_error turns FastAPI's 422 for a malformed body into OpenAI's 400.
"""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from leapllm.engine.async_engine import (
    EngineOverloadedError,
    EngineStepError,
    EngineStoppedError,
)
from leapllm.errors import LeapLLMError
from leapllm.serving.protocol import ErrorInfo, ErrorResponse


class ApiError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def as_api_error(exc: BaseException) -> ApiError:
    """The status and OpenAI error fields for any exception a request can end with."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, EngineOverloadedError):
        return ApiError(503, str(exc), "server_error", code="overloaded", headers={"Retry-After": "1"})
    if isinstance(exc, EngineStoppedError):
        return ApiError(503, str(exc), "server_error", code="shutting_down")
    if isinstance(exc, LeapLLMError):  # InvalidRequestError, TokenizerError (a bad conversation), ...
        return ApiError(400, str(exc))
    if isinstance(exc, EngineStepError):
        return ApiError(500, str(exc), "server_error", code="engine_error")
    return ApiError(500, f"internal server error ({type(exc).__name__})", "server_error", code="internal_error")


def error_body(err: ApiError) -> dict:
    return ErrorResponse(error=ErrorInfo(message=err.message, type=err.type, param=err.param,
                                         code=err.code)).model_dump()


def error_response(exc: BaseException) -> JSONResponse:
    err = as_api_error(exc)
    return JSONResponse(error_body(err), status_code=err.status, headers=err.headers)


def _is_union_tag(part) -> bool:
    # pydantic names the member of a union in an error's location ("str", "list[str]", "StreamOptions");
    # field names are snake_case, so anything else is a tag.
    return isinstance(part, str) and (part[:1].isupper() or "[" in part or "-" in part
                                      or part in ("str", "int", "float", "bool", "dict", "list"))


def validation_error(exc: RequestValidationError) -> ApiError:
    """FastAPI's 422 as OpenAI's 400: one message naming the field, the field as `param`."""
    errors = exc.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return ApiError(400, f"the request body is not valid JSON: {detail}".rstrip(": "))
    loc = [p for p in first["loc"] if p != "body" and not _is_union_tag(p)]
    param = ".".join(str(p) for p in loc) or None
    # Every member of a union reports its own error: join them, once each.
    messages = []
    for e in errors:
        if [p for p in e["loc"] if p != "body" and not _is_union_tag(p)] == loc:
            msg = e["msg"].removeprefix("Value error, ")
            if msg not in messages:
                messages.append(msg)
    # "Input should be a valid string or a valid list", not "... or Input should be a valid list"
    text = " or ".join([messages[0]] + [m.removeprefix("Input should be ") for m in messages[1:]])
    if first["type"] == "missing" and not param:
        text = "the request has no JSON body"
    return ApiError(400, f"{param}: {text}" if param else text, param=param)
