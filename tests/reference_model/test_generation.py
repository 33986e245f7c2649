"""The KV cache, masks, positions and stopping rules of the reference generation."""
import numpy as np
import torch

from bridge_export.reference_model.heads import additive_mask
from bridge_export.reference_model.model import _TorchDecoder


def _inputs(model, B=2):
    g = torch.Generator().manual_seed(7)
    pv = torch.randn(B, 3, 32, 32, generator=g)
    prompt = torch.tensor([[1, 5, 6, 7]] * B)
    return pv, prompt


def test_cache_equals_full_recompute_greedy_and_beam(tiny_model):
    pv, prompt = _inputs(tiny_model)
    for beams in (1, 3):
        a = tiny_model.generate(pv, prompt, max_new_tokens=10, num_beams=beams)
        b = tiny_model.generate(pv, prompt, max_new_tokens=10, num_beams=beams, use_cache=False)
        assert torch.equal(a, b)
    cached = _TorchDecoder(tiny_model, pv, prompt, torch.ones_like(prompt), use_cache=True)
    full = _TorchDecoder(tiny_model, pv, prompt, torch.ones_like(prompt), use_cache=False)
    np.testing.assert_allclose(cached.prefill(), full.prefill(), atol=1e-5)
    for tok in ([3, 4], [9, 10], [11, 12]):
        t = np.array(tok)
        np.testing.assert_allclose(cached.step(t, None), full.step(t, None), atol=1e-5)


def test_min_new_tokens_and_eos_stop(tiny_model):
    pv, prompt = _inputs(tiny_model, 1)
    eos = tiny_model.config.qllama.eos_token_id
    # Make EOS the most likely token everywhere: it must still wait for min_new_tokens.
    with torch.no_grad():
        old = tiny_model.qllama.lm_head.weight[eos].clone()
        tiny_model.qllama.lm_head.weight[eos] = tiny_model.qllama.lm_head.weight.sum(0) * 50
        try:
            out = tiny_model.generate(pv, prompt, max_new_tokens=10, min_new_tokens=4)
            beam = tiny_model.generate(pv, prompt, max_new_tokens=10, min_new_tokens=4, num_beams=2)
        finally:
            tiny_model.qllama.lm_head.weight[eos] = old
    assert out.shape[1] == 5 and out[0, 4] == eos and (out[0, :4] != eos).all()
    assert beam[0, -1] == eos and (beam[0, :4] != eos).all()


def test_masks_queries_bidirectional_text_causal():
    Q, T = 3, 4
    allowed = additive_mask(torch.ones(1, Q + T), Q + T, bidirectional_prefix=Q)[0, 0] == 0
    assert allowed[:Q, :Q].all()  # queries see each other both ways
    assert not allowed[:Q, Q:].any()  # and never the text
    assert allowed[Q:, :Q].all()  # text sees every query
    assert torch.equal(allowed[Q:, Q:], torch.tril(torch.ones(T, T, dtype=torch.bool)))  # causal text
    # A decode step (T=1) over a past with a padded slot: sees everything real.
    step = additive_mask(torch.tensor([[1, 1, 0, 1]]), 1)[0, 0, 0] == 0
    assert step.tolist() == [True, True, False, True]


def test_positions_queries_then_text(tiny_model):
    pv, prompt = _inputs(tiny_model, 1)
    dec = _TorchDecoder(tiny_model, pv, prompt, torch.ones_like(prompt), use_cache=True)
    Q = tiny_model.num_query_token
    assert dec._positions()[0].tolist() == list(range(Q + prompt.shape[1]))


def test_prompt_too_long_errors(tiny_model):
    pv, _ = _inputs(tiny_model, 1)
    long = torch.ones(1, 120, dtype=torch.long)
    try:
        tiny_model.generate(pv, long, max_new_tokens=10)
    except ValueError as e:
        assert "max_position_embeddings" in str(e)
    else:
        raise AssertionError("expected ValueError")
