"""The onnxruntime target's vision encoder and bridge (fused operators) against the portable graphs."""
import numpy as np
import onnx
import pytest

from bridge_export import runtime
from bridge_export.exporter.export import fused_vision
from bridge_export.exporter.export.stream_export import export_model
from bridge_export.runtime.manifest import read_manifest


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("fused_vision")
    portable = export_model(tiny_model, root / "portable", precision="fp32")
    fused = export_model(tiny_model, root / "fused", precision="fp32", target="onnxruntime")
    return portable, fused


def _ops(bundle, graph):
    return [n.op_type for n in onnx.load(str(bundle / f"{graph}.onnx"), load_external_data=False).graph.node]


def test_fused_graphs_hold_the_contrib_operators_and_say_so(bundles):
    portable, fused = bundles
    vis, br = _ops(fused, "vision_encoder"), _ops(fused, "query_bridge")
    # tiny: 2 InternViT layers + the C pooling head; 2 cross-attention layers (of 4) + the G pooling head
    assert vis.count("MultiHeadAttention") == 3 and br.count("MultiHeadAttention") == 3
    assert "SkipSimplifiedLayerNormalization" in vis and "SkipSimplifiedLayerNormalization" in br
    assert "Softmax" not in vis  # every vision attention fused
    assert br.count("Softmax") == 4  # the bridge's rotated self-attention over the queries stays unfused
    assert "MultiHeadAttention" not in _ops(portable, "vision_encoder")
    graphs = read_manifest(fused).graphs
    assert graphs["vision_encoder"].target == graphs["query_bridge"].target == "onnxruntime"
    assert read_manifest(portable).graphs["vision_encoder"].target == "tensorrt"


def test_fused_embeddings_equal_the_portable_ones(bundles):
    portable, fused = bundles
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    with runtime.load(portable) as a, runtime.load(fused) as b:
        for mode in ("C", "G"):
            np.testing.assert_allclose(b.encode_image(x, mode), a.encode_image(x, mode), atol=1e-5, rtol=0)
        ha, ca = a.vision(x)
        hb, cb = b.vision(x)
        np.testing.assert_allclose(hb, ha, atol=1e-5, rtol=0)
        ga, pa = a.bridge(ha)
        gb, pb = b.bridge(ha)
        np.testing.assert_allclose(gb, ga, atol=1e-5, rtol=0)
        for u, v in zip(pa, pb):  # the visual prefix the decoder starts from
            np.testing.assert_allclose(v, u, atol=1e-5, rtol=0)


def test_fp16_graphs_are_left_as_written(tiny_model, tmp_path):
    b = export_model(tiny_model, tmp_path / "fp16", precision="fp16")
    m = onnx.load(str(b / "vision_encoder.onnx"), load_external_data=False)
    before = len(m.graph.node)
    assert fused_vision.fuse_graph(m) == {} and len(m.graph.node) == before
