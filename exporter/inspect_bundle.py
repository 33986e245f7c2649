"""A readable table of a bundle's manifest (`bridge-export inspect`)."""
from __future__ import annotations


def _shape(s) -> str:
    return "[" + ",".join(str(d) for d in s) + "]"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def format_manifest(man) -> str:
    """The manifest as aligned text: model, graphs with their tensors (layer 0 as {i}), KV layout, files."""
    m = man.model
    v, q = m.get("vision_config", {}), m.get("qllama_config", {})
    dims, kv, pre = man.dims, man.kv_layout, man.preprocessing
    cap = man.prompts.caption
    tok = man.tokenizer
    lines = [
        f"bundle      {man.root}",
        f"format      {man.format} v{man.format_version}   precision {man.precision.mode}   source {man.source}",
        "versions    " + "  ".join(f"{k}={val}" for k, val in man.versions.items()),
        f"vision      {v.get('num_hidden_layers', '?')} layers x {dims.vision_hidden_size}  image {pre.image_size}px "
        f"patch {v.get('patch_size', '?')}",
        f"qllama      {kv.num_layers} layers x {dims.text_hidden_size}  heads {kv.num_heads}  "
        f"vocab {dims.vocab_size}  positions {dims.max_positions}  queries {dims.num_query_token}",
        "tokenizer   " + (f"{tok.file}" + (f" + {tok.sentencepiece} (SentencePiece encodes)" if tok.sentencepiece else "")
                          if tok else "none (array API only)"),
        f"caption     {cap.prompt!r}  beams {cap.num_beams}  new tokens {cap.min_new_tokens}..{cap.max_new_tokens}",
        f"limits      max batch {man.limits.max_batch}  max seq {man.limits.max_seq or dims.max_positions}",
        "",
    ]
    per_layer = {kv.past(0)[0], kv.past(0)[1], kv.present(0)[0], kv.present(0)[1], kv.prefix(0)[0], kv.prefix(0)[1]}
    other_layers = {n for i in range(1, kv.num_layers) for n in kv.past(i) + kv.present(i) + kv.prefix(i)}
    for name, g in man.graphs.items():
        lines.append(f"graph {name}  ({g.file}, {g.precision}, opset {g.checks.get('opset', '?')}, "
                     f"{len(g.tensorrt_profiles)} TensorRT profile(s))")
        for io, tensors in (("in ", g.inputs), ("out", g.outputs)):
            for t in tensors:
                if t.name in other_layers:
                    continue
                nm = t.name.replace(".0.", ".{i}.") if t.name in per_layer else t.name
                lines.append(f"   {io} {nm:<32} {t.dtype:<8} {_shape(t.shape)}")
        if g.report:
            lines.append(f"   accuracy {g.report}")
    lines += ["", f"kv cache    {kv.num_layers} layers x {kv.num_heads} heads x {kv.head_dim}  "
                  f"visual prefix {kv.prefix_length} slots; text from position {kv.text_start_position}",
              f"kv names    past {kv.past_key} / {kv.past_value}   present {kv.present_key} / {kv.present_value}   "
              f"prefix {kv.prefix_key} / {kv.prefix_value}"]
    lines.append("files       " + "  ".join(f"{k} ({_size(e.size)}, {e.sha256[:10]})" for k, e in man.files.items()))
    return "\n".join(lines)
