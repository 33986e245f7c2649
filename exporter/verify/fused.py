"""`verify` for the fused decoder: the portable decoder's cases run through the shared KV buffer.

The fused decoder (exporter.export.fused_decoder) has other inputs and outputs than the PyTorch step
module `verify` compares against, so each portable case is translated: the past K/V go into slots
0..P-1 of a SharedKVCache, each row feeds its real tokens (right padding: `query_seqlens`), and the
outputs are read back in the portable layout. Only what both define is compared: positions a row
really has (a padded position's hidden state and K/V are the fused graph's to leave unspecified), and
the logits of rows without padding (the portable graph's logits are those of the last position, pad or
not; the fused graph's are the last real token's).
"""
from __future__ import annotations

import numpy as np


def run_fused_cases(session, layout, cases: list[dict], refs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(fused outputs, reference outputs), both restricted to what both define, per case, keyed as the
    portable outputs (logits, hidden_states, present.*) and flattened over the compared positions."""
    from bridge_export.runtime.kv_cache import FusedStep, SharedKVCache

    step = FusedStep(session, layout)
    gots, kept = [], []
    for feeds, ref in zip(cases, refs):
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        B, T = ids.shape
        P = mask.shape[1] - T
        lens = mask[:, P:].sum(1).astype(np.int32)
        cache = SharedKVCache(layout.num_layers, B, layout.num_heads, P + T, layout.head_dim)
        if P:
            cache.write_prefix([feeds[n] for n in layout.names("past")])
        logits, hidden = step.run(cache, ids, lens, hidden=True)
        real = np.arange(T)[None, :] < lens[:, None]  # (B, T) positions the row really has
        full = lens == T
        got = {"logits": logits[full].copy(), "hidden_states": hidden[real]}
        want = {"logits": ref["logits"][full], "hidden_states": ref["hidden_states"][real]}
        for i, (k, v) in enumerate(zip(layout.names("present")[0::2], layout.names("present")[1::2])):
            for name, j in ((k, 0), (v, 1)):
                new = cache.data[i, j][:, :, P:P + T].transpose(0, 2, 1, 3)  # (B, T, heads, head_dim)
                got[name] = new[real]
                want[name] = ref[name].transpose(0, 2, 1, 3)[real]
        gots.append(got)
        kept.append(want)
    return gots, kept
