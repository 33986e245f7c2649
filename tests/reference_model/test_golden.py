"""The reference reproduces every array the ORIGINAL implementation saved in the golden fixture."""
import numpy as np
import pytest
import torch

from bridge_export import reference_model


@pytest.fixture(scope="module")
def golden(golden_dir):
    return reference_model.load_pretrained(golden_dir), dict(np.load(golden_dir / "golden.npz"))


def _close(x, y, rtol=1e-5, atol=1e-5):
    x = x.detach().numpy() if torch.is_tensor(x) else x
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def test_embeddings_and_logits(golden):
    m, g = golden
    pv, ids = torch.from_numpy(g["pixel_values"]), torch.from_numpy(g["input_ids"])
    _close(m.vision_features(pv), g["vision_last_hidden_state"])
    _close(m.encode_image(pv, "InternVL-C"), g["image_embeds_C"])
    _close(m.encode_image(pv, "InternVL-G"), g["image_embeds_G"])
    _close(m.encode_text(ids), g["text_embeds"])
    _close(m.query_features(m.vision_features(pv))[0], g["image_query_hidden_G"])
    _close(m.text_features(ids), g["text_last_hidden"])
    for mode in ("C", "G"):
        per_image, per_text = m(pv, ids, f"InternVL-{mode}")
        _close(per_image, g[f"logits_per_image_{mode}"], rtol=1e-4, atol=1e-4)
        assert torch.equal(per_text, per_image.t())


def test_prefill_logits_mask_and_positions(golden):
    from bridge_export.reference_model.heads import additive_mask

    m, g = golden
    pv = torch.from_numpy(g["pixel_values"][:1])
    prompt = torch.from_numpy(g["gen_prompt_ids"])
    Q = m.num_query_token
    key_mask = torch.ones(1, Q + prompt.shape[1], dtype=torch.long)
    mask = additive_mask(key_mask, Q + prompt.shape[1], bidirectional_prefix=Q)
    np.testing.assert_array_equal((mask == 0).long().numpy(), g["prefill_allowed"])
    np.testing.assert_array_equal(mask.numpy(), g["prefill_additive_mask"])
    emb = torch.cat([m.query_tokens, m.qllama.model.embed_tokens(prompt)], 1)
    pos = torch.from_numpy(g["prefill_position_ids"])
    hidden, _ = m.qllama.model(emb, pos, mask, vision=m.vision_features(pv))
    _close(m.qllama.lm_head(hidden), g["prefill_logits"], rtol=1e-4, atol=1e-4)


def test_greedy_and_beam_tokens(golden):
    m, g = golden
    pv = torch.from_numpy(g["pixel_values"])
    prompt, am = torch.from_numpy(g["gen_prompt_ids"]), torch.from_numpy(g["gen_attention_mask"])
    greedy = m.generate(pv[:1], prompt, am, max_new_tokens=12, min_new_tokens=12)
    np.testing.assert_array_equal(greedy.numpy(), g["gen_greedy_new_tokens"])
    greedy1 = m.generate(pv[1:2], prompt, am, max_new_tokens=12, min_new_tokens=12)
    np.testing.assert_array_equal(greedy1.numpy(), g["gen_greedy_new_tokens_img1"])
    beam, score = m.generate(pv[:1], prompt, am, max_new_tokens=8, min_new_tokens=8, num_beams=3,
                             return_scores=True)
    np.testing.assert_array_equal(beam.numpy(), g["gen_beam3_new_tokens"])
    np.testing.assert_allclose(score.numpy(), g["gen_beam3_sequence_score"], rtol=1e-5)


def test_step_logits_match_original(golden):
    """Per-step greedy logits from the cached decoder equal the original's, row by row."""
    from bridge_export.reference_model.model import _TorchDecoder

    m, g = golden
    pv = torch.from_numpy(g["pixel_values"][:1])
    prompt, am = torch.from_numpy(g["gen_prompt_ids"]), torch.from_numpy(g["gen_attention_mask"])
    dec = _TorchDecoder(m, pv, prompt, am, use_cache=True)
    rows = [dec.prefill()]
    for tok in g["gen_greedy_new_tokens"][0][:-1]:
        rows.append(dec.step(np.array([tok]), None))
    np.testing.assert_allclose(np.concatenate(rows), g["gen_greedy_step_logits"], rtol=1e-4, atol=1e-4)
