"""Typed results: labelled zero-shot predictions that still read as numpy arrays; normalised embeddings."""
import numpy as np

from bridge_export.runtime.results import Classification


def test_classification_reads_by_label_and_as_an_array():
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    c = Classification(("cat", "dog", "fish"), probs)
    assert c.best_labels == ["dog", "cat"] and len(c) == 2 and c.shape == (2, 3)
    assert c[0].label == "dog" and c[0].score == 0.7
    assert c[1].top(2) == [("cat", 0.5), ("fish", 0.3)]
    assert c[0].as_dict() == {"cat": 0.1, "dog": 0.7, "fish": 0.2}
    np.testing.assert_array_equal(np.asarray(c), probs)
    np.testing.assert_array_equal(np.asarray(c[1]), probs[1])
    assert [p.label for p in c] == ["dog", "cat"]


def test_pipeline_classify_and_normalized_embeddings(tiny_text_bundle):
    from bridge_export import runtime

    pipe = runtime.load(tiny_text_bundle)
    rng = np.random.default_rng(0)
    images = [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(3)]
    c = pipe.classify(images, ["cat", "dog"], template="a photo of a {}.")
    assert isinstance(c, Classification) and c.labels == ("cat", "dog")
    np.testing.assert_allclose(np.asarray(c).sum(1), 1.0, rtol=1e-5)
    raw = pipe.embed_images(images)
    unit = pipe.embed_images(images, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-5)
    t = pipe.embed_texts(["cat", "dog"], normalize=True)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, rtol=1e-5)
    pipe.close()
