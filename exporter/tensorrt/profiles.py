"""TensorRT optimization profiles (min / opt / max shape per input) from the manifest's numbers alone.

Torch-free: the exporter stores these in the manifest at export time, and `bridge-export engine`
recomputes them from the same manifest when the user asks for other limits, on a machine without
torch (a Jetson).
"""
from __future__ import annotations

from bridge_export.runtime.manifest import KVLayout, Limits, ModelDims

Profile = dict[str, tuple[list[int], list[int], list[int]]]


def vision_profiles(dims: ModelDims, limits: Limits) -> list[Profile]:
    """vision_encoder: pixel_values over batch 1..max_batch."""
    s, B = dims.image_size, limits.max_batch
    return [{"pixel_values": ([1, 3, s, s], [max(1, B // 2), 3, s, s], [B, 3, s, s])}]


def bridge_profiles(dims: ModelDims, limits: Limits) -> list[Profile]:
    """query_bridge: vision_hidden over batch 1..max_batch."""
    n, dv, B = dims.num_image_tokens, dims.vision_hidden_size, limits.max_batch
    return [{"vision_hidden": ([1, n, dv], [max(1, B // 2), n, dv], [B, n, dv])}]


def decoder_profiles(kv: KVLayout, limits: Limits) -> list[Profile]:
    """text_decoder: a prefill profile (many tokens, past 0..S-1) and a decode profile (one token)."""
    H, Dh = kv.num_heads, kv.head_dim
    B, S = limits.max_batch, limits.seq(kv.max_positions)
    ob = max(1, B // 2)

    def kv_range(p):
        return [1, H, p[0], Dh], [ob, H, p[1], Dh], [B, H, p[2], Dh]

    def one(t, p):
        prof = {"input_ids": ([1, t[0]], [ob, t[1]], [B, t[2]]),
                "position_ids": ([1, t[0]], [ob, t[1]], [B, t[2]]),
                "attention_mask": ([1, t[0] + p[0]], [ob, t[1] + p[1]], [B, min(S, t[2] + p[2])])}
        prof.update({name: kv_range(p) for name in kv.names("past")})
        return prof

    Q = kv.prefix_length
    prefill = one((1, min(64, S // 2), S), (0, min(Q, S // 2), S - 1))
    decode = one((1, 1, 1), (0, min(S // 2, Q + 64), S - 1))
    return [prefill, decode]


def graph_profiles(graph: str, dims: ModelDims, kv: KVLayout, limits: Limits) -> list[Profile]:
    """The profiles of the named graph; checks min <= opt <= max on every dim."""
    if graph == "vision_encoder":
        profiles = vision_profiles(dims, limits)
    elif graph == "query_bridge":
        profiles = bridge_profiles(dims, limits)
    elif graph == "text_decoder":
        profiles = decoder_profiles(kv, limits)
    else:
        raise ValueError(f"unknown graph {graph!r}")
    for prof in profiles:
        for name, (mn, opt, mx) in prof.items():
            if not all(a <= b <= c for a, b, c in zip(mn, opt, mx)):
                raise ValueError(f"{graph}: profile for {name} is not min <= opt <= max: {mn} {opt} {mx}")
    return profiles


def to_json(profiles: list[Profile]) -> list[dict[str, list[list[int]]]]:
    """Profiles as the manifest stores them (lists, not tuples)."""
    return [{k: [list(s) for s in v] for k, v in p.items()} for p in profiles]


def from_json(stored: list[dict[str, list[list[int]]]]) -> list[Profile]:
    """Profiles read back from the manifest."""
    return [{k: tuple(list(s) for s in v) for k, v in p.items()} for p in stored]
