"""verify in bounded memory: reference parts (the rest on meta) and one onnxruntime session at a time."""
import numpy as np
import pytest
import torch

from bridge_export import reference_model
from bridge_export import runtime
from bridge_export.exporter.verify.parity import verify_bundle
from bridge_export.exporter.verify.parts import GRAPH_PARTS, LANGUAGE_PART, OneSessionAtATime, ReferenceSource
from bridge_export.runtime.manifest import read_manifest
from bridge_export.runtime.pipeline import Pipeline
from bridge_export.runtime.text import TextCodec


@pytest.mark.parametrize("make", ["preset", "checkpoint"])
def test_parts_hold_only_their_tensors_with_the_full_values(make, tiny_model, tiny_checkpoint):
    source = ReferenceSource.from_preset("tiny", 0) if make == "preset" else ReferenceSource.from_checkpoint(
        tiny_checkpoint)
    full = dict(tiny_model.state_dict())
    for name, select in GRAPH_PARTS.items():
        part = source.part(select)
        loaded = {k for k, v in part.state_dict().items() if not v.is_meta}
        assert loaded == {k for k in full if select(k)}, name
        for k in loaded:
            assert torch.equal(part.state_dict()[k], full[k]), k
    assert not any("cross_attn" in k for k in full if GRAPH_PARTS["text_decoder"](k))
    assert all(source.part(LANGUAGE_PART).vision_model.state_dict()[k].is_meta
               for k in tiny_model.vision_model.state_dict())


def test_verify_from_a_source_passes_and_fails(tiny_bundle):
    report = verify_bundle(tiny_bundle, ReferenceSource.from_preset("tiny", 0))
    assert report.passed, report.format()
    assert set(report.polygraphy) == {"vision_encoder", "query_bridge", "text_decoder"}
    assert {t.name for t in report.tokens} == {"greedy", "beam3"}
    bad = verify_bundle(tiny_bundle, ReferenceSource.from_preset("tiny", 1), use_polygraphy=False)
    assert not bad.passed


def test_one_session_at_a_time_gives_the_pipeline_outputs(tiny_bundle):
    manifest = read_manifest(tiny_bundle, verify_checksums=False)
    sessions = OneSessionAtATime(manifest)
    opened = []
    real_activate = sessions.activate

    def activate(name):
        s = real_activate(name)
        opened.append(name)
        assert sessions.open_name == name  # the other graph was closed before this one opened
        return s

    sessions.activate = activate
    rng = np.random.default_rng(0)
    pix = rng.standard_normal((2, 3, 32, 32), dtype=np.float32)
    prompts = np.array([[1, 5, 6], [1, 7, 8]])
    with Pipeline(manifest, sessions, TextCodec.from_manifest(manifest)) as lean, runtime.load(tiny_bundle) as full:
        np.testing.assert_array_equal(lean.encode_image(pix, "InternVL-G"), full.encode_image(pix, "InternVL-G"))
        np.testing.assert_array_equal(lean.generate(pix, prompts, max_new_tokens=5, num_beams=2),
                                      full.generate(pix, prompts, max_new_tokens=5, num_beams=2))
    assert {"vision_encoder", "query_bridge", "text_decoder"} <= set(opened)
    assert sessions.open_name is None  # closed with the pipeline


def test_source_of_a_model_in_memory(tiny_model):
    src = ReferenceSource.from_model(tiny_model)
    assert src.part(GRAPH_PARTS["vision_encoder"]) is tiny_model
    assert isinstance(src.full(), reference_model.InternVLModel)


def test_reference_end_to_end_leaves_a_given_model_unchanged(tiny_model):
    from bridge_export.exporter.verify.parity import _e2e_inputs, _reference_end_to_end
    from bridge_export.reference_model.vision import InternViT

    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    pix, ids, prompts = _e2e_inputs(tiny_model.config, 0)
    _reference_end_to_end(ReferenceSource.from_model(tiny_model), pix, ids, prompts, 2, beams=(1,))
    assert isinstance(tiny_model.vision_model, InternViT)
    after = tiny_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
