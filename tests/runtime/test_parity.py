"""The runtime equals the reference call for call (tiny preset), batched and streamed alike."""
import numpy as np
import pytest
import torch

from bridge_export import runtime
from bridge_export.runtime.numeric import row_cosines


@pytest.fixture(scope="module")
def pipe(tiny_text_bundle):
    p = runtime.load(tiny_text_bundle)
    yield p
    p.close()


def _pix(n=3, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32), dtype=np.float32)


_cos = row_cosines


@pytest.mark.parametrize("mode", ["InternVL-C", "InternVL-G"])
def test_encode_image(pipe, tiny_model, mode):
    x = _pix()
    ref = tiny_model.encode_image(torch.from_numpy(x), mode).numpy()
    got = pipe.encode_image(x, mode)
    assert _cos(ref, got).min() >= 0.99999
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_encode_text_with_padding(pipe, tiny_model):
    ids = np.array([[1, 5, 9, 2, 0, 0], [1, 7, 8, 9, 10, 2], [1, 3, 2, 0, 0, 0]])
    ref = tiny_model.encode_text(torch.from_numpy(ids)).numpy()
    got = pipe.encode_text(ids)
    assert _cos(ref, got).min() >= 0.99999


@pytest.mark.parametrize("beams", [1, 3])
def test_generate_tokens_identical(pipe, tiny_model, beams):
    x = _pix(2)
    prompt = np.array([[1, 5, 6, 7], [1, 5, 6, 7]])
    ref, ref_s = tiny_model.generate(torch.from_numpy(x), torch.from_numpy(prompt), max_new_tokens=10,
                                     min_new_tokens=3, num_beams=beams, return_scores=True)
    got, got_s = pipe.generate(x, prompt, max_new_tokens=10, min_new_tokens=3, num_beams=beams, return_scores=True)
    np.testing.assert_array_equal(got, ref.numpy())
    np.testing.assert_allclose(got_s, ref_s.numpy(), atol=1e-4)


def test_left_padded_prompts_match_reference(pipe, tiny_model):
    x = _pix(2)
    prompt = np.array([[0, 0, 1, 5], [1, 5, 6, 7]])
    mask = (np.arange(4)[None] >= np.array([[2], [0]])).astype(np.int64)
    ref = tiny_model.generate(torch.from_numpy(x), torch.from_numpy(prompt), torch.from_numpy(mask), max_new_tokens=6)
    got = pipe.generate(x, prompt, mask, max_new_tokens=6)
    np.testing.assert_array_equal(got, ref.numpy())


def test_sampling_seeded_equals_reference(pipe, tiny_model):
    x = _pix(1)
    prompt = np.array([[1, 5, 6, 7]])
    kw = dict(max_new_tokens=8, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=123,
              repetition_penalty=1.2)
    ref = tiny_model.generate(torch.from_numpy(x), torch.from_numpy(prompt), **kw).numpy()
    got = pipe.generate(x, prompt, **kw)
    np.testing.assert_array_equal(got, ref)


def test_streaming_equals_non_streaming(pipe):
    x = _pix(1)
    prompt = np.array([[1, 5, 6, 7]])
    steps = list(pipe.iter_generate(x, prompt, max_new_tokens=9))
    np.testing.assert_array_equal(np.stack(steps, 1), pipe.generate(x, prompt, max_new_tokens=9))
    img = (np.random.default_rng(3).random((40, 50, 3)) * 255).astype(np.uint8)
    streamed = "".join(pipe.caption_stream(img, "English caption:", max_new_tokens=9, min_new_tokens=2))
    full = pipe.caption(img, "English caption:", max_new_tokens=9, min_new_tokens=2, num_beams=1)
    assert streamed.strip() == full.text and full.text


def test_batch_equals_single(pipe):
    x = _pix(3, seed=5)
    batch = pipe.encode_image(x, "InternVL-G")
    single = np.concatenate([pipe.encode_image(x[i:i + 1], "InternVL-G") for i in range(3)])
    np.testing.assert_allclose(batch, single, atol=1e-5)
    prompt = np.array([[1, 5, 6, 7]] * 3)
    gb = pipe.generate(x, prompt, max_new_tokens=6, num_beams=2)
    gs = [pipe.generate(x[i:i + 1], prompt[:1], max_new_tokens=6, num_beams=2) for i in range(3)]
    for i in range(3):
        np.testing.assert_array_equal(gb[i, : gs[i].shape[1]], gs[i][0])
    imgs = [(np.random.default_rng(i).random((20, 30, 3)) * 255).astype(np.uint8) for i in range(3)]
    caps = pipe.captions(imgs, max_new_tokens=5, min_new_tokens=1, num_beams=2)
    assert [c.tokens for c in caps] == [pipe.caption(im, max_new_tokens=5, min_new_tokens=1, num_beams=2).tokens
                                        for im in imgs]
    texts = ["a cat", "the digit seven on a mat", "photo of a dog"]
    np.testing.assert_allclose(pipe.embed_texts(texts), np.concatenate([pipe.embed_texts([t]) for t in texts]),
                               atol=1e-5)


def test_user_level_calls(pipe):
    imgs = [(np.random.default_rng(i).random((32, 32, 3)) * 255).astype(np.uint8) for i in range(2)]
    sim = pipe.similarity(imgs, ["a cat", "a dog", "a photo"])
    assert sim.shape == (2, 3) and np.isfinite(sim).all()
    probs = pipe.classify(imgs, ["cat", "dog"], template="a photo of a {}")
    assert probs.shape == (2, 2)
    np.testing.assert_allclose(np.asarray(probs).sum(1), 1, atol=1e-6)
    assert pipe.embed_images(imgs, mode="G").shape == (2, 24)
    cap = pipe.caption(imgs[0], max_new_tokens=6, min_new_tokens=2)
    assert len(cap.tokens) >= 2 and isinstance(cap.score, float)


def test_text_ids_follow_the_original_convention(pipe):
    ids = pipe.codec.embedding_ids(["a cat", "the digit seven"])
    # summarize: prefix, BOS first, EOS last real token, right padding with 0
    assert ids[0].tolist() == [1, 3, 6, 7, 2, 0] and ids[1].tolist() == [1, 3, 11, 12, 13, 2]
    assert pipe.codec.prompt_ids("English caption:").tolist() == [[1, 4, 5]]


def test_batch_limit_chunks_and_errors(tiny_text_bundle):
    """With a backend batch limit (TensorRT profiles), user calls chunk and array calls explain the limit."""
    p = runtime.load(tiny_text_bundle)
    imgs = [(np.random.default_rng(i).random((20, 30, 3)) * 255).astype(np.uint8) for i in range(5)]
    free = p.captions(imgs, max_new_tokens=4, min_new_tokens=1, num_beams=2)
    p.max_batch = 4
    limited = p.captions(imgs, max_new_tokens=4, min_new_tokens=1, num_beams=2)
    assert [c.tokens for c in limited] == [c.tokens for c in free]
    np.testing.assert_allclose(p.embed_images(imgs), runtime.load(tiny_text_bundle).embed_images(imgs), atol=1e-6)
    with pytest.raises(ValueError, match="exceeds the engines' largest batch 4"):
        p.generate(_pix(3), np.array([[1, 5]] * 3), max_new_tokens=2, num_beams=2)
