"""A request's output constraint, from whichever field the client used to ask for it.

OpenAI's `response_format` ({"type": "json_object"} or {"type": "json_schema", "json_schema":
{"name", "schema", "strict"}}), vLLM's `structured_outputs` ({json | regex | choice | grammar |
json_object}) and its older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` all
become one StructuredOutputParams; more than one of them is a 400, as is one that does not compile.
"""

from __future__ import annotations

from typing import Any

from leapllm.engine.structured_output import KINDS, StructuredOutputParams
from leapllm.errors import InvalidRequestError
from leapllm.serving.errors import ApiError
from leapllm.serving.protocol import SamplingRequest

GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}


def _from_response_format(fmt: dict[str, Any]) -> StructuredOutputParams | None:
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputParams(json_object=True)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise ApiError(400, "response_format.json_schema must be an object with 'name' and 'schema'",
                           param="response_format.json_schema")
        schema = spec.get("schema", {"type": "object"})  # OpenAI lets the schema be left out: any object
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format.json_schema.schema must be a JSON schema object",
                           param="response_format.json_schema.schema")
        return StructuredOutputParams(json=schema)
    raise ApiError(400, f"response_format.type {kind!r} is not supported; use 'text', 'json_object' or "
                   "'json_schema'", param="response_format.type")


def _from_structured_outputs(spec: dict[str, Any]) -> StructuredOutputParams:
    unknown = sorted(set(spec) - set(KINDS) - {"disable_any_whitespace", "whitespace_pattern", "backend"})
    if unknown:
        raise ApiError(400, f"structured_outputs has unknown keys {unknown}; expected one of {', '.join(KINDS)}",
                       param="structured_outputs")
    return StructuredOutputParams(**{k: v for k, v in spec.items() if k in KINDS})


def requested_structured_output(req: SamplingRequest) -> tuple[StructuredOutputParams | None, str | None]:
    """(the constraint the request asks for, the field it came from), or (None, None)."""
    candidates = []
    if req.response_format is not None:
        candidates.append(("response_format", lambda: _from_response_format(req.response_format)))
    if req.structured_outputs is not None:
        candidates.append(("structured_outputs", lambda: _from_structured_outputs(req.structured_outputs)))
    for name, kind in GUIDED_FIELDS.items():
        if getattr(req, name) is not None:
            candidates.append((name, lambda name=name, kind=kind: StructuredOutputParams(**{kind: getattr(req, name)})))
    asked = []
    for field, build in candidates:
        try:
            so = build()
        except InvalidRequestError as exc:
            raise ApiError(400, f"{field}: {exc}", param=field) from None
        if so is not None:
            asked.append((so, field))
    if len(asked) > 1:
        raise ApiError(400, f"ask for one structured output, not {len(asked)} ({', '.join(p for _, p in asked)})",
                       param=asked[1][1])
    return asked[0] if asked else (None, None)
