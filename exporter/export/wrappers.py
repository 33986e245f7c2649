"""The three graphs as nn.Modules over the reference model (export-only views, no new weights)."""
from __future__ import annotations

from torch import nn

from bridge_export.reference_model.heads import additive_mask
from bridge_export.reference_model.model import InternVLModel


class VisionEncoderGraph(nn.Module):
    """pixel_values [B,3,H,W] -> vision_hidden [B,Nv,Dv], image_embeds_c [B,E]."""

    def __init__(self, model: InternVLModel):
        super().__init__()
        self.m = model

    def forward(self, pixel_values):
        hidden = self.m.vision_model(pixel_values)
        return hidden, self.m.clip_projector(hidden)


class QueryBridgeGraph(nn.Module):
    """vision_hidden -> image_embeds_g [B,E] and the visual prefix: per layer K, V [B,H,Q,Dh]."""

    def __init__(self, model: InternVLModel):
        super().__init__()
        self.m = model

    def forward(self, vision_hidden):
        hidden, kv = self.m.query_features(vision_hidden)
        flat = [t for pair in kv for t in pair]
        return (self.m.clip_projector2(hidden), *flat)


class TextDecoderGraph(nn.Module):
    """One QLLaMA step with a KV cache, no cross-attention.

    Inputs: input_ids [B,T], position_ids [B,T], attention_mask [B,P+T] (1 = real key),
    past_key_values.{i}.key/value [B,H,P,Dh]. Outputs: logits [B,V] of the last position only,
    hidden_states [B,T,D] (final norm; the text-embedding path), and present.{i}.key/value
    [B,H,T,Dh]: the K/V of the T new positions only, which the runtime writes into its
    preallocated cache (so no graph ever copies the whole cache per step).
    """

    def __init__(self, model: InternVLModel):
        super().__init__()
        self.m = model

    def forward(self, input_ids, position_ids, attention_mask, *past_flat):
        trunk = self.m.qllama.model
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(len(past_flat) // 2)]
        mask = additive_mask(attention_mask, input_ids.shape[1])
        hidden, kv = trunk(trunk.embed_tokens(input_ids), position_ids, mask, past=past)
        logits = self.m.qllama.lm_head(hidden[:, -1]).float()  # (B, V): never (B, T, V)
        return (logits, hidden, *[t for pair in kv for t in pair])
