"""The prompt and structured output every AI provider asks for, and their loading.

The built-in prompt and schema (description, tags, objects, colors, mood, text) are shared
by the Gemini and the OpenAI-compatible providers, so both give the same records.
`loads_strict` reads an answer as a strict JSON parser would, and `validate` checks it
against a JSON Schema where the server does not enforce it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from imgbatch.errors import ConfigError

DEFAULT_PROMPT = (
    "Describe this photo for a searchable catalogue. Answer in JSON with: description "
    "(one or two plain sentences), tags (5 to 15 lower-case keywords), objects (the main "
    "visible objects), colors (dominant colour names), mood (one or two words) and text "
    "(any legible text in the image, or an empty string)."
)

#: the default structured output, in Gemini's OpenAPI form (it is also part of Gemini's
#: settings fingerprint: changing it makes every stored Gemini result stale); documented
#: in the README, field by field
DEFAULT_SCHEMA: dict[str, Any] = {
    "type": "OBJECT",
    "properties": {
        "description": {"type": "STRING"},
        "tags": {"type": "ARRAY", "items": {"type": "STRING"}},
        "objects": {"type": "ARRAY", "items": {"type": "STRING"}},
        "colors": {"type": "ARRAY", "items": {"type": "STRING"}},
        "mood": {"type": "STRING"},
        "text": {"type": "STRING"},
    },
    "required": ["description", "tags", "objects", "colors", "mood", "text"],
    "propertyOrdering": ["description", "tags", "objects", "colors", "mood", "text"],
}


def _as_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "propertyOrdering":
            continue
        if key == "type":
            value = value.lower()
        elif key == "properties":
            value = {name: _as_json_schema(sub) for name, sub in value.items()}
        elif key == "items":
            value = _as_json_schema(value)
        out[key] = value
    if out.get("type") == "object":
        out["additionalProperties"] = False  # what OpenAI's strict mode requires
    return out


#: the same schema as JSON Schema (what OpenAI-compatible servers take), strict-ready:
#: every property required, no others
DEFAULT_JSON_SCHEMA: dict[str, Any] = _as_json_schema(DEFAULT_SCHEMA)


def load_prompt(prompt: str, prompt_file: str) -> str:
    """The prompt: the file's text when a file is given, else `prompt`, else the built-in."""
    if prompt_file:
        try:
            return Path(prompt_file).expanduser().read_text("utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the prompt file: {exc}") from None
    return prompt or DEFAULT_PROMPT


def load_schema(path: str) -> dict[str, Any] | None:
    """The JSON Schema in the file at `path`, or None (the built-in one) when no file."""
    if not path:
        return None
    try:
        schema = json.loads(Path(path).expanduser().read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"cannot read the JSON Schema {path}: {exc}") from None
    if not isinstance(schema, dict):
        raise ConfigError(f"the JSON Schema in {path} is not an object")
    return schema


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999: a number no strict parser or writer keeps
        raise ValueError(f"{text} is out of range")
    return value


def loads_strict(text: str | bytes) -> Any:
    """`text` as JSON, read strictly: Python's `json` takes NaN, Infinity and -Infinity
    (and reads 1e999 as infinity), which no strict JSON parser accepts and no output of
    ours may carry; here each is a ValueError, as any other invalid JSON."""
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite)


_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}


def validate(value: Any, schema: Any) -> str | None:
    """Why `value` does not match `schema` (the first reason, with where), or None.

    Checks what decides whether a record is usable: `type` (JSON Schema or OpenAPI
    spelling, `nullable`), `required`, `properties`, `items`, `enum`, `const`,
    `minItems`/`maxItems`, `anyOf`/`oneOf`/`allOf` and local `$ref`s. Other keywords are
    not checked, and properties the schema does not name are kept: a model that adds a
    field has still answered what was asked.
    """
    return _check(value, schema, schema, "", 0)


def _check(value: Any, schema: Any, root: Any, where: str, depth: int) -> str | None:
    if not isinstance(schema, dict) or depth > 32:
        return None
    at = where or "the answer"
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        target: Any = root
        for part in ref[1:].strip("/").split("/") if ref != "#" else []:
            target = target.get(part) if isinstance(target, dict) else None
        return _check(value, target, root, where, depth + 1)
    if "const" in schema and value != schema["const"]:
        return f"{at}: expected {json.dumps(schema['const'])}"
    if isinstance(schema.get("enum"), list) and value not in schema["enum"]:
        return f"{at}: not one of {json.dumps(schema['enum'])[:80]}"
    for combiner in ("anyOf", "oneOf"):
        options = schema.get(combiner)
        if isinstance(options, list) and options:
            if all(_check(value, o, root, where, depth + 1) for o in options):
                return f"{at}: matches none of the {combiner} choices"
    for sub in schema.get("allOf") or []:
        error = _check(value, sub, root, where, depth + 1)
        if error:
            return error
    kinds = schema.get("type")
    if kinds is not None:
        names = [str(k).lower() for k in (kinds if isinstance(kinds, list) else [kinds])]
        if schema.get("nullable"):
            names.append("null")
        if not any(_is(value, name) for name in names):
            return f"{at}: expected {' or '.join(names)}, got {_kind(value)}"
    if isinstance(value, dict):
        for name in schema.get("required") or []:
            if name not in value:
                return f"{at}: missing {name!r}"
        properties = schema.get("properties")
        for name, sub in properties.items() if isinstance(properties, dict) else ():
            if name in value:
                error = _check(value[name], sub, root, f"{where}.{name}".lstrip("."), depth + 1)
                if error:
                    return error
    if isinstance(value, list):
        low, high = schema.get("minItems"), schema.get("maxItems")
        if isinstance(low, int) and len(value) < low:
            return f"{at}: fewer than {low} items"
        if isinstance(high, int) and len(value) > high:
            return f"{at}: more than {high} items"
        items = schema.get("items")
        for i, item in enumerate(value):
            error = _check(item, items, root, f"{where}[{i}]", depth + 1)
            if error:
                return error
    return None


def _is(value: Any, name: str) -> bool:
    if isinstance(value, bool) and name in ("number", "integer"):
        return False  # JSON has no booleans that are numbers
    if name == "number" and isinstance(value, float):
        return True
    if name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES.get(name, object))


def _kind(value: Any) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _is(value, name):
            return name
    return type(value).__name__
