"""The manifest's JSON Schema is derived from the typed records, and real manifests conform to it."""
import dataclasses
import json

import pytest

from bridge_export.runtime import manifest as m
from bridge_export.runtime.manifest_schema import manifest_schema


def test_every_record_field_is_in_the_schema():
    schema = manifest_schema()
    for cls in (m.Manifest, m.GraphInfo, m.TensorInfo, m.KVLayout, m.PrecisionInfo, m.TokenizerInfo):
        props = schema["properties"] if cls is m.Manifest else schema["$defs"][cls.__name__]["properties"]
        assert set(props) == {f.name for f in cls._json_fields()}, cls
    required = set(schema["required"])
    assert {"dims", "graphs", "kv_layout", "special_tokens", "preprocessing"} <= required
    assert "tokenizer" not in required and schema["properties"]["format_version"] == {"const": m.FORMAT_VERSION}
    assert all(f.name in schema["$defs"]["TensorInfo"]["required"] for f in dataclasses.fields(m.TensorInfo)
               if f.name != "extra")


def test_a_written_manifest_conforms(tiny_text_bundle):
    jsonschema = pytest.importorskip("jsonschema")
    doc = json.loads((tiny_text_bundle / m.MANIFEST).read_text())
    jsonschema.validate(doc, manifest_schema())
    doc["graphs"]["vision_encoder"]["inputs"][0]["shape"] = "not a list"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, manifest_schema())
