"""A JSON Schema of manifest.json, generated from the typed records in runtime.manifest.

    python -m bridge_export.runtime.manifest_schema > manifest.schema.json

The records are the contract (the runtime reads them, the exporter writes them); the schema is
derived from them, never written by hand, so it cannot drift. Unknown keys are allowed, as the
reader keeps them (optional fields are added within a format version).
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from bridge_export.runtime import manifest as m

_SCALARS = {int: {"type": "integer"}, float: {"type": "number"}, str: {"type": "string"}, bool: {"type": "boolean"},
            dict: {"type": "object"}, list: {"type": "array"}}


def _schema(tp, defs: dict) -> dict:
    if tp is Any:
        return {}
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [{"type": "null"} if a is type(None) else _schema(a, defs) for a in typing.get_args(tp)]}
    if origin is list:
        (arg,) = typing.get_args(tp)
        return {"type": "array", "items": _schema(arg, defs)}
    if origin is dict:
        _, arg = typing.get_args(tp)
        return {"type": "object", "additionalProperties": _schema(arg, defs)}
    if isinstance(tp, type) and issubclass(tp, m.Record):
        if tp.__name__ not in defs:
            defs[tp.__name__] = {}  # placeholder first: records may refer to each other
            defs[tp.__name__] = _record(tp, defs)
        return {"$ref": f"#/$defs/{tp.__name__}"}
    if tp in _SCALARS:
        return dict(_SCALARS[tp])
    raise TypeError(f"no JSON Schema for {tp!r}")


def _record(cls, defs: dict) -> dict:
    hints = typing.get_type_hints(cls)
    props, required = {}, []
    for f in cls._json_fields():
        props[f.name] = _schema(hints[f.name], defs)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
        elif f.default is not dataclasses.MISSING and f.default is not None:
            props[f.name]["default"] = f.default
    out = {"type": "object", "description": (cls.__doc__ or "").strip().splitlines()[0], "properties": props}
    if required:
        out["required"] = required
    return out


def manifest_schema() -> dict:
    """The JSON Schema (draft 2020-12) of a bundle's manifest.json."""
    defs: dict = {}
    root = _record(m.Manifest, defs)
    root["properties"]["format"] = {"const": m.FORMAT}
    root["properties"]["format_version"] = {"const": m.FORMAT_VERSION}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": f"{m.FORMAT} manifest.json "
            f"(format version {m.FORMAT_VERSION})", **root, "$defs": defs}


if __name__ == "__main__":
    print(json.dumps(manifest_schema(), indent=2))
