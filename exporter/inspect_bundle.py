"""A readable table of a bundle's manifest (`bridge-export inspect`)."""
from __future__ import annotations


def _shape(s) -> str:
    return "[" + ",".join(str(d) for d in s) + "]"


def format_manifest(man) -> str:
    """The manifest as aligned text: model, graphs with their tensors, KV layout, files."""
    d = man.data
    m = d["model"]
    v, q = m["vision_config"], m["qllama_config"]
    lines = [
        f"bundle      {man.root}",
        f"format      {d['format']} v{d['format_version']}   precision {d['precision']}   source {d.get('source', '')}",
        "versions    " + "  ".join(f"{k}={val}" for k, val in d["versions"].items()),
        f"vision      {v['num_hidden_layers']} layers x {v['hidden_size']}  image {d['preprocessing']['image_size']}px "
        f"patch {v['patch_size']}",
        f"qllama      {q['num_hidden_layers']} layers x {q['hidden_size']}  heads {q['num_attention_heads']}  "
        f"vocab {q['vocab_size']}  positions {q['max_position_embeddings']}  queries {m['num_query_token']}",
        "tokenizer   " + (f"{d['tokenizer']['file']}" + (" + SentencePiece merge order (tied scores)"
                                                      if d["tokenizer"].get("exact_bpe") else "")
                             if d.get("tokenizer") else "none (array API only)"),
        "",
    ]
    for name, g in d["graphs"].items():
        lines.append(f"graph {name}  ({g['file']}, {g['precision']}, opset {g.get('checks', {}).get('opset', '?')})")
        tensors = g["inputs"] + g["outputs"]
        compact = []
        for t in tensors:
            if any(f".{i}." in t["name"] for i in range(1, q["num_hidden_layers"])):
                continue
            compact.append(t)
        for t in compact:
            io = "in " if t in g["inputs"] else "out"
            nm = t["name"].replace(".0.", ".{i}.")
            lines.append(f"   {io} {nm:<32} {t['dtype']:<8} {_shape(t['shape'])}")
        if g.get("report"):
            lines.append(f"   accuracy {g['report']}")
    kv = d["kv_layout"]
    lines += ["", f"kv cache    {kv['num_layers']} layers x {kv['num_heads']} heads x {kv['head_dim']}  "
                  f"visual prefix {kv['visual_prefix']['length']} slots; text from position {kv['text_start_position']}"]
    lines.append("files       " + "  ".join(f"{k} ({v[:10]})" for k, v in d["files"].items()))
    return "\n".join(lines)
