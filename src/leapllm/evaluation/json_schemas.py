"""A suite of JSON schemas for structured outputs: the shapes agents and data extraction ask for.

The tests hold every output to them (tests/engine, tests/serving) and benchmarks/grammar_engines.py
compiles and walks them with each grammar engine.

Nested objects, arrays with item bounds, enums, numbers with ranges, strings with patterns and
formats, optional fields, anyOf, $defs references and constants; each is paired with a request
that the default model can answer in a few dozen tokens.
"""

from __future__ import annotations

import json

NAME = {"type": "string", "minLength": 1, "maxLength": 24}

SCHEMAS: dict[str, dict] = {
    "person": {
        "type": "object",
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False,
    },
    "enum_color": {
        "type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"], "additionalProperties": False,
    },
    "bounded_array": {
        "type": "object",
        "properties": {"fruits": {"type": "array", "items": NAME, "minItems": 2, "maxItems": 4}},
        "required": ["fruits"], "additionalProperties": False,
    },
    "number_range": {
        "type": "object",
        "properties": {"temperature": {"type": "number", "minimum": -50, "maximum": 60},
                       "unit": {"enum": ["C", "F"]}},
        "required": ["temperature", "unit"], "additionalProperties": False,
    },
    "pattern_code": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}},
        "required": ["code"], "additionalProperties": False,
    },
    "format_date": {
        "type": "object", "properties": {"event": NAME, "date": {"type": "string", "format": "date"}},
        "required": ["event", "date"], "additionalProperties": False,
    },
    "format_email": {
        "type": "object", "properties": {"name": NAME, "email": {"type": "string", "format": "email", "maxLength": 40}},
        "required": ["name", "email"], "additionalProperties": False,
    },
    "format_uuid_ipv4": {
        "type": "object",
        "properties": {"id": {"type": "string", "format": "uuid"}, "ip": {"type": "string", "format": "ipv4"}},
        "required": ["id", "ip"], "additionalProperties": False,
    },
    "optional_fields": {
        "type": "object",
        "properties": {"title": NAME, "subtitle": NAME, "pages": {"type": "integer", "minimum": 1, "maximum": 2000}},
        "required": ["title"], "additionalProperties": False,
    },
    "nested_address": {
        "type": "object",
        "properties": {
            "name": NAME,
            "address": {"type": "object",
                        "properties": {"street": NAME, "city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["street", "city", "zip"], "additionalProperties": False},
        },
        "required": ["name", "address"], "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "object",
        "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"sku": NAME, "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
            "required": ["sku", "qty"], "additionalProperties": False}}},
        "required": ["items"], "additionalProperties": False,
    },
    "any_of": {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                           {"type": "string", "enum": ["none", "many"]}]}},
        "required": ["value"], "additionalProperties": False,
    },
    "boolean_flags": {
        "type": "object",
        "properties": {"is_open": {"type": "boolean"}, "has_parking": {"type": "boolean"}},
        "required": ["is_open", "has_parking"], "additionalProperties": False,
    },
    "nullable": {
        "type": "object",
        "properties": {"nickname": {"anyOf": [NAME, {"type": "null"}]}},
        "required": ["nickname"], "additionalProperties": False,
    },
    "const_version": {
        "type": "object",
        "properties": {"version": {"const": "1.0"}, "status": {"enum": ["ok", "error"]}},
        "required": ["version", "status"], "additionalProperties": False,
    },
    "defs_ref": {
        "$defs": {"point": {"type": "object",
                            "properties": {"x": {"type": "integer", "minimum": -100, "maximum": 100},
                                           "y": {"type": "integer", "minimum": -100, "maximum": 100}},
                            "required": ["x", "y"], "additionalProperties": False}},
        "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"], "additionalProperties": False,
    },
    "top_level_array": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 10},
                        "minItems": 3, "maxItems": 3},
    "exclusive_range": {
        "type": "object",
        "properties": {"probability": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}},
        "required": ["probability"], "additionalProperties": False,
    },
    "sentiment": {
        "type": "object",
        "properties": {"label": {"enum": ["positive", "negative", "neutral"]},
                       "score": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["label", "score"], "additionalProperties": False,
    },
    "string_lengths": {
        "type": "object",
        "properties": {"initials": {"type": "string", "minLength": 2, "maxLength": 3, "pattern": "^[A-Z]+$"},
                       "motto": {"type": "string", "maxLength": 40}},
        "required": ["initials", "motto"], "additionalProperties": False,
    },
    "unique_tags": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["news", "sport", "tech", "art"]},
                                "minItems": 1, "maxItems": 2}},
        "required": ["tags"], "additionalProperties": False,
    },
    "deep_nesting": {
        "type": "object",
        "properties": {"company": {"type": "object", "properties": {
            "name": NAME,
            "ceo": {"type": "object", "properties": {"name": NAME, "since": {"type": "integer", "minimum": 1900,
                                                                           "maximum": 2030}},
                    "required": ["name", "since"], "additionalProperties": False}},
            "required": ["name", "ceo"], "additionalProperties": False}},
        "required": ["company"], "additionalProperties": False,
    },
}


def schema_prompt(name: str) -> list[dict]:
    """A chat that asks for one JSON object of schema `name` (the schema is in the prompt, as usual)."""
    schema = json.dumps(SCHEMAS[name])
    return [{"role": "user", "content": f"Reply with JSON that matches this schema, and nothing else:\n{schema}"}]
