"""runtime.load(graphs=...): only the graphs a task needs are opened, and a call needing another says so."""
from __future__ import annotations

import numpy as np
import pytest

from bridge_export import runtime
from bridge_export.runtime.pipeline import GraphNotOpen


def test_graphs_for_tasks():
    assert runtime.graphs_for("embed_image_c") == ("vision_encoder",)
    assert runtime.graphs_for("embed_image") == ("vision_encoder", "query_bridge")
    assert runtime.graphs_for("embed_text", "embed_image_c") == ("vision_encoder", "text_decoder")
    assert runtime.graphs_for("caption") == tuple(runtime.GRAPHS)
    with pytest.raises(ValueError, match="unknown tasks"):
        runtime.graphs_for("captions")


def test_only_the_vision_encoder(tiny_bundle):
    full = runtime.load(tiny_bundle)
    with runtime.load(tiny_bundle, graphs=["vision_encoder"]) as pipe:
        assert sorted(pipe.sessions) == ["vision_encoder"]
        pix = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
        assert np.array_equal(pipe.encode_image(pix, "C"), full.encode_image(pix, "C"))
        with pytest.raises(GraphNotOpen, match="needs the query_bridge graph, which was not opened.*'query_bridge'"):
            pipe.encode_image(pix, "G")
        with pytest.raises(GraphNotOpen, match="needs the text_decoder graph"):
            pipe.encode_text(np.ones((1, 3), np.int64))
        with pytest.raises(GraphNotOpen, match="needs the text_decoder graph"):
            pipe.generate(pix[:1], np.ones((1, 2), np.int64), max_new_tokens=2)
    with runtime.load(tiny_bundle, graphs=runtime.graphs_for("embed_text")) as pipe:
        ids = np.array([[5, 6, 7]])
        assert np.array_equal(pipe.encode_text(ids), full.encode_text(ids))
    full.close()


@pytest.mark.parametrize("graphs,match", [([], "at least one"), (["decoder"], "unknown \\['decoder'\\]"),
                                          ("vision_encoder", "must be a list of graph names")])
def test_bad_graphs_refused(tiny_bundle, graphs, match):
    with pytest.raises(ValueError, match=match):
        runtime.load(tiny_bundle, graphs=graphs)
