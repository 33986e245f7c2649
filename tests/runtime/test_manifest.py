"""The typed manifest: JSON round trip, unknown keys kept, templates, defaults, errors naming the field."""
import json
import shutil

import numpy as np
import pytest

from bridge_export import runtime
from bridge_export.runtime.manifest import (GRAPHS, BundleError, KVLayout, Manifest, manifest_digest, parse_manifest,
                              read_manifest)


def _copy(bundle, tmp_path):
    return shutil.copytree(bundle, tmp_path / "b")


def test_round_trip_is_exact(tiny_bundle):
    raw = json.loads((tiny_bundle / "manifest.json").read_text())
    man = read_manifest(tiny_bundle)
    assert isinstance(man, Manifest) and tuple(man.graphs) == GRAPHS
    assert man.to_dict() == raw
    assert manifest_digest(man.to_dict()) == raw["manifest_sha256"]


def test_unknown_keys_are_kept_when_rewritten(tiny_bundle, tmp_path):
    """Forward compatibility: keys a newer writer added survive a read-modify-write by this version."""
    raw = json.loads((tiny_bundle / "manifest.json").read_text())
    raw["serving"] = {"triton": {"max_queue_delay_us": 100}}
    raw["graphs"]["text_decoder"]["engine_hint"] = "fp16"
    man = parse_manifest(raw, tiny_bundle)
    assert man.extra == {"serving": {"triton": {"max_queue_delay_us": 100}}}
    assert man.graphs["text_decoder"].extra == {"engine_hint": "fp16"}
    b = _copy(tiny_bundle, tmp_path)
    man.precision.report["kept_fp32_nodes"] = 12
    man.save(b)
    again = read_manifest(b)  # the new digest matches, so it loads
    assert again.extra["serving"]["triton"]["max_queue_delay_us"] == 100
    assert again.graphs["text_decoder"].extra == {"engine_hint": "fp16"}
    assert again.precision.report == {"kept_fp32_nodes": 12}


def test_missing_or_mistyped_field_is_named(tiny_bundle):
    raw = json.loads((tiny_bundle / "manifest.json").read_text())
    del raw["kv_layout"]["num_heads"]
    with pytest.raises(BundleError, match=r"manifest.kv_layout lacks \['num_heads'\].*re-export"):
        parse_manifest(raw, tiny_bundle)
    raw = json.loads((tiny_bundle / "manifest.json").read_text())
    raw["prompts"]["caption"]["num_beams"] = "five"
    with pytest.raises(BundleError, match="manifest.prompts.caption.num_beams must be int"):
        parse_manifest(raw, tiny_bundle)


def test_kv_name_templates():
    kv = KVLayout(num_layers=3, num_heads=2, head_dim=4, prefix_length=5, max_positions=64)
    assert kv.past(2) == ("past_key_values.2.key", "past_key_values.2.value")
    assert kv.present(0) == ("present.0.key", "present.0.value")
    assert kv.prefix(1) == ("prefix.1.key", "prefix.1.value")
    assert kv.names("past")[:3] == ["past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key"]
    assert len(kv.layers()) == 3 and kv.layers()[1][2:] == kv.present(1)
    other = KVLayout.from_dict({**kv.to_dict(), "past_key": "cache.{i}.k"})
    assert other.past(7)[0] == "cache.7.k"
    with pytest.raises(ValueError, match="kind"):
        kv.names("future")


def test_caption_defaults_come_from_the_manifest(tiny_text_bundle, tmp_path):
    b = _copy(tiny_text_bundle, tmp_path)
    man = read_manifest(b)
    man.prompts.caption.max_new_tokens = 3
    man.prompts.caption.min_new_tokens = 3
    man.prompts.caption.num_beams = 2
    man.save(b)
    pipe = runtime.load(b)
    img = np.full((32, 32, 3), 128, np.uint8)
    cap = pipe.caption(img)
    assert 1 <= len(cap.tokens) <= 3
    same = pipe.caption(img, max_new_tokens=3, min_new_tokens=3, num_beams=2)
    assert cap.tokens == same.tokens and cap.score == pytest.approx(same.score)
