"""InternVLModel: InternViT + QLLaMA + attention-pooling heads, call for call as the original."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bridge_export.runtime.search import SearchConfig, SearchResult, search

from bridge_export.reference_model.config import InternVLConfig
from bridge_export.reference_model.heads import AttentionPoolingBlock, additive_mask
from bridge_export.reference_model.qllama import QLlamaForCausalLM
from bridge_export.reference_model.vision import InternViT

MODES = ("InternVL-C", "InternVL-G")


class InternVLModel(nn.Module):
    """The InternVL-14B model (InternVL-C / InternVL-G) with the original state-dict names."""

    def __init__(self, config: InternVLConfig):
        super().__init__()
        self.config = config
        v, q = config.vision, config.qllama
        self.num_query_token = config.num_query_token
        self.vision_model = InternViT(v, config.image_size)
        self.qllama = QLlamaForCausalLM(q, v.hidden_size, config.num_query_token)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_token, q.hidden_size))
        self.text_projection = nn.Parameter(torch.zeros(q.hidden_size, config.clip_embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        self.clip_projector = AttentionPoolingBlock(v.hidden_size, config.attn_pool_num_heads, config.clip_embed_dim)
        self.clip_projector2 = AttentionPoolingBlock(q.hidden_size, config.attn_pool_num_heads, config.clip_embed_dim)
        self.itm_head = nn.Linear(q.hidden_size, 2)  # in every checkpoint; unused at inference

    # -- the pieces the exported graphs are made of ------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """InternViT last hidden state (B, 1 + patches, Dv), CLS first, no final norm."""
        return self.vision_model(pixel_values)

    def query_features(self, vision_hidden: torch.Tensor):
        """QLLaMA over the query tokens alone (bidirectional, positions 0..Q-1, cross-attention).

        Returns the final-norm query states (B, Q, D) and every layer's self-attention (K, V) of
        the query positions: the visual prefix of the KV cache, (B, H, Q, Dh) each.
        """
        B, Q = vision_hidden.shape[0], self.num_query_token
        x = self.query_tokens.expand(B, -1, -1).to(vision_hidden.dtype)
        pos = torch.arange(Q, device=x.device)[None].expand(B, -1)
        mask = torch.zeros(B, 1, Q, Q, device=x.device)
        return self.qllama.model(x, pos, mask, vision=vision_hidden)

    def text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """QLLaMA final-norm states of the text alone (causal + padding mask `ids > 0`, positions from 0)."""
        key_mask = input_ids > 0
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand(input_ids.shape[0], -1)
        emb = self.qllama.model.embed_tokens(input_ids)
        hidden, _ = self.qllama.model(emb, pos, additive_mask(key_mask, input_ids.shape[1]))
        return hidden

    # -- the original's public calls ---------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, pixel_values: torch.Tensor, mode: str = "InternVL-C") -> torch.Tensor:
        """Image embedding: C = clip_projector(ViT); G = normalize(C) + normalize(clip_projector2(queries))."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        vis = self.vision_features(pixel_values)
        c = self.clip_projector(vis)
        if mode == "InternVL-C":
            return c
        g = self.clip_projector2(self.query_features(vis)[0])
        return c / c.norm(dim=1, keepdim=True) + g / g.norm(dim=1, keepdim=True)

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text embedding: hidden state of the last non-pad token (right padding, pad 0) @ text_projection."""
        hidden = self.text_features(input_ids)
        last = (input_ids > 0).sum(1) - 1
        if (last < 0).any():
            raise ValueError("encode_text got a row with no tokens (all ids are 0 = pad)")
        return hidden[torch.arange(hidden.shape[0]), last] @ self.text_projection

    @torch.no_grad()
    def forward(self, image: torch.Tensor, text: torch.Tensor, mode: str = "InternVL-C"):
        """(logits_per_image, logits_per_text) = exp(logit_scale) * normalized image @ text.T."""
        img = self.encode_image(image, mode)
        txt = self.encode_text(text)
        img = img / img.norm(dim=1, keepdim=True)
        txt = txt / txt.norm(dim=1, keepdim=True)
        logits = self.logit_scale.exp() * img @ txt.t()
        return logits, logits.t()

    @torch.no_grad()
    def generate(self, pixel_values, input_ids, attention_mask=None, max_new_tokens: int = 20,
                 min_new_tokens: int = 0, num_beams: int = 1, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, seed: int | None = None, use_cache: bool = True,
                 return_scores: bool = False):
        """Caption tokens for images and prompts: returns only the new tokens (B, n), pad after EOS.

        Prefix-LM as the original: queries at positions 0..Q-1, the prompt from Q (left padding
        shifts positions as transformers' cumsum does), cross-attention in the prefill only.
        `use_cache=False` recomputes the full sequence every step (for checking the cache).
        """
        q = self.config.qllama
        cfg = SearchConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
                           do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                           repetition_penalty=repetition_penalty, eos_token_id=q.eos_token_id,
                           pad_token_id=q.pad_token_id, seed=seed)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        total = self.num_query_token + input_ids.shape[1] + max_new_tokens
        if total > q.max_position_embeddings:
            raise ValueError(f"{self.num_query_token} queries + prompt {input_ids.shape[1]} + max_new_tokens "
                             f"{max_new_tokens} exceeds max_position_embeddings {q.max_position_embeddings}")
        dec = _TorchDecoder(self, pixel_values, input_ids, attention_mask, use_cache)
        result: SearchResult = search(dec, cfg)
        tokens = torch.from_numpy(result.tokens)
        return (tokens, torch.from_numpy(result.scores)) if return_scores else tokens

    def save_pretrained(self, directory) -> None:
        """Write config.json + model.safetensors in the original layout."""
        from bridge_export.reference_model.saving import save_pretrained

        save_pretrained(self, directory)


class _TorchDecoder:
    """The reference's generation state for `bridge_export.runtime.search`: a concatenating KV cache."""

    @torch.no_grad()
    def __init__(self, model: InternVLModel, pixel_values, input_ids, attention_mask, use_cache: bool):
        self.m, self.use_cache = model, use_cache
        self.vision = model.vision_features(pixel_values)
        B, Q = input_ids.shape[0], model.num_query_token
        emb = model.qllama.model.embed_tokens(input_ids)
        self.embeds = torch.cat([model.query_tokens.expand(B, -1, -1).to(emb.dtype), emb], 1)  # (B, Q+T, D)
        self.mask = torch.cat([torch.ones(B, Q, dtype=torch.long), attention_mask.long()], 1)  # (B, Q+T)
        self.past = None

    def _positions(self) -> torch.Tensor:
        pos = self.mask.cumsum(-1) - 1
        return pos.masked_fill(self.mask == 0, 1)  # transformers' convention for padded slots

    def _run(self, embeds, mask_4d, pos, vision, past):
        hidden, kv = self.m.qllama.model(embeds, pos, mask_4d, vision=vision, past=past)
        return self.m.qllama.lm_head(hidden[:, -1]).float(), kv

    @torch.no_grad()
    def prefill(self) -> np.ndarray:
        """Run queries + prompt (prefix-LM, cross-attention); logits of the last position."""
        mask = additive_mask(self.mask, self.embeds.shape[1], bidirectional_prefix=self.m.num_query_token)
        logits, kv = self._run(self.embeds, mask, self._positions(), self.vision, None)
        self.past = kv
        return logits.numpy()

    def expand(self, n: int) -> None:
        """Repeat every row n times (beam search)."""
        rep = lambda t: t.repeat_interleave(n, dim=0)  # noqa: E731
        self.vision, self.embeds, self.mask = rep(self.vision), rep(self.embeds), rep(self.mask)
        self.past = [(rep(k), rep(v)) for k, v in self.past]

    @torch.no_grad()
    def step(self, tokens: np.ndarray, reorder: np.ndarray | None) -> np.ndarray:
        """Reorder rows (beams), append one token per row, return its logits."""
        if reorder is not None:
            idx = torch.from_numpy(reorder)
            self.embeds, self.mask = self.embeds[idx], self.mask[idx]
            self.past = [(k[idx], v[idx]) for k, v in self.past]
        tok = torch.from_numpy(tokens)[:, None]
        new = self.m.qllama.model.embed_tokens(tok)
        self.embeds = torch.cat([self.embeds, new], 1)
        self.mask = torch.cat([self.mask, torch.ones_like(tok)], 1)
        pos = self._positions()
        if not self.use_cache:
            mask = additive_mask(self.mask, self.embeds.shape[1], bidirectional_prefix=self.m.num_query_token)
            return self._run(self.embeds, mask, pos, self.vision, None)[0].numpy()
        logits, kv = self._run(new, additive_mask(self.mask, 1), pos[:, -1:], None, self.past)
        self.past = [(torch.cat([pk, k], 2), torch.cat([pv, v], 2)) for (pk, pv), (k, v) in zip(self.past, kv)]
        return logits.numpy()
