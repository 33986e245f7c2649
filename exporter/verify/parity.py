"""Parity verification: every graph and the end-to-end pipeline against the PyTorch reference.

A library function (`verify_bundle`) that the CLI and the tests both call. Graph-level checks
always compute max abs/rel error and cosine per output, and have Polygraphy's Comparator judge the
same outputs when Polygraphy is installed. Memory: one graph and the reference tensors it uses at a
time (exporter/verify_parts.py), never the whole reference beside all three sessions.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field

import numpy as np
import torch

from bridge_export.runtime.numeric import min_row_cosine, normalize
from bridge_export.runtime.progress import get_logger, reporter

from bridge_export.exporter.export.specs import all_specs, kv_layout
from bridge_export.exporter.verify.parts import GRAPH_PARTS, LANGUAGE_PART, VISION_PART, OneSessionAtATime, ReferenceSource

log = get_logger(__name__)


@dataclass
class OutputCheck:
    """One compared output."""

    where: str
    name: str
    max_abs: float
    max_rel: float
    cosine: float
    ok: bool


@dataclass
class TokenCheck:
    """One compared token sequence."""

    name: str
    reference: list
    bundle: list
    ok: bool


@dataclass
class VerifyReport:
    """All checks; `passed` only if every one passed."""

    outputs: list[OutputCheck] = field(default_factory=list)
    tokens: list[TokenCheck] = field(default_factory=list)
    polygraphy: dict[str, bool] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when every output, token and Polygraphy check passed."""
        return (all(o.ok for o in self.outputs) and all(t.ok for t in self.tokens)
                and all(self.polygraphy.values()))

    def format(self) -> str:
        """A readable table of every check."""
        lines = [f"{'where':<34} {'output':<26} {'max abs':>10} {'max rel':>10} {'cosine':>10}  ok"]
        for o in self.outputs:
            lines.append(f"{o.where:<34} {o.name:<26} {o.max_abs:>10.3g} {o.max_rel:>10.3g} {o.cosine:>10.7f}  "
                         f"{'yes' if o.ok else 'NO'}")
        for t in self.tokens:
            lines.append(f"{'tokens':<34} {t.name:<26} {'identical' if t.ok else 'DIFFERENT':>32}  "
                         f"{'yes' if t.ok else 'NO'}"
                         + ("" if t.ok else f"\n    reference {t.reference}\n    bundle    {t.bundle}"))
        for g, ok in self.polygraphy.items():
            lines.append(f"{'polygraphy comparator':<34} {g:<26} {'':>32}  {'yes' if ok else 'NO'}")
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


def compare(where: str, name: str, ref: np.ndarray, got: np.ndarray, atol: float, rtol: float,
            cosine_min: float) -> OutputCheck:
    """Max abs/rel error and cosine of `got` against `ref`; ok if allclose(atol, rtol) and cosine holds."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref.shape != got.shape:
        return OutputCheck(where, name, float("inf"), float("inf"), 0.0, False)
    err = np.abs(ref - got)
    max_abs = float(err.max()) if err.size else 0.0
    max_rel = float((err / np.maximum(np.abs(ref), 1e-6)).max()) if err.size else 0.0
    cos = min_row_cosine(ref, got)
    ok = bool(np.all(err <= atol + rtol * np.abs(ref))) and cos >= cosine_min
    return OutputCheck(where, name, max_abs, max_rel, cos, ok)


def _decoder_feeds(config, B, P, T, pad_tail: int, seed: int) -> dict[str, np.ndarray]:
    q = config.qllama
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, q.vocab_size, (B, T)).astype(np.int64)
    mask = np.ones((B, P + T), np.int64)
    if pad_tail and B > 1:  # right padding on row 0, as text embedding uses
        ids[0, T - pad_tail:] = q.pad_token_id
        mask[0, P + T - pad_tail:] = 0
    feeds = {"input_ids": ids, "position_ids": np.broadcast_to(np.arange(P, P + T), (B, T)).copy(),
             "attention_mask": mask}
    for name in kv_layout(config).names("past"):
        feeds[name] = rng.standard_normal((B, q.num_attention_heads, P, q.head_dim), dtype=np.float32)
    return feeds


def graph_cases(config, batch_sizes=(1, 2), seed: int = 0) -> dict[str, list[dict[str, np.ndarray]]]:
    """Feeds per graph: several batch sizes; the decoder also at P=0 with padding, prefill and decode."""
    rng = np.random.default_rng(seed)
    s, Q = config.image_size, config.num_query_token
    cases = {
        "vision_encoder": [{"pixel_values": rng.standard_normal((b, 3, s, s), dtype=np.float32)}
                           for b in batch_sizes],
        "query_bridge": [{"vision_hidden": rng.standard_normal((b, config.num_image_tokens, config.vision.hidden_size),
                                                               dtype=np.float32)} for b in batch_sizes],
        "text_decoder": [
            _decoder_feeds(config, max(batch_sizes), 0, 7, pad_tail=3, seed=seed),  # text embedding: P = 0
            _decoder_feeds(config, 1, Q, 5, pad_tail=0, seed=seed + 1),  # caption prefill after the prefix
            _decoder_feeds(config, max(batch_sizes) + 1, Q + 6, 1, pad_tail=0, seed=seed + 2),  # decode step
        ],
    }
    return cases


def _torch_outputs(module, spec, feeds) -> dict[str, np.ndarray]:
    args = [torch.from_numpy(np.ascontiguousarray(feeds[t.name])) for t in spec.inputs]
    with torch.no_grad():
        outs = module(*args)
    return {t.name: np.ascontiguousarray(o.detach().float().numpy()) for t, o in zip(spec.outputs, outs)}


def _polygraphy_accuracy(spec, refs: list[dict], gots: list[dict]) -> bool | None:
    """Polygraphy's Comparator.compare_accuracy over outputs already computed (PyTorch vs onnxruntime).

    The two sides are run one after the other by `verify_graphs` (so they are never in memory
    together); Polygraphy's comparison library then judges them with the graph's tolerance.
    """
    try:
        from polygraphy.comparator import Comparator, IterationResult, RunResults, SimpleCompareFunc
    except ImportError:
        return None
    import logging

    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    logging.getLogger("polygraphy").setLevel(logging.ERROR)
    results = RunResults()
    for runner, outs in (("pytorch", refs), ("onnxruntime", gots)):
        results.append((runner, [IterationResult({k: np.asarray(v) for k, v in o.items()}, runtime=0.0,
                                                 runner_name=runner) for o in outs]))
    tol = spec.tolerance
    return bool(Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=tol["atol"], rtol=tol["rtol"])))


def _as_source(model) -> ReferenceSource:
    return model if isinstance(model, ReferenceSource) else ReferenceSource.from_model(model)


def verify_graphs(bundle, model, report: VerifyReport, batch_sizes=(1, 2), seed: int = 0,
                  use_polygraphy: bool = True, progress=None) -> None:
    """Each graph on onnxruntime against its PyTorch module on the same feeds.

    `model`: an InternVLModel or a ReferenceSource. One graph at a time: the reference part the graph
    uses computes every case, is freed, then the graph's session runs them and is closed.
    """
    from bridge_export.runtime.manifest import read_manifest
    from bridge_export.runtime.backends import open_session

    progress = reporter(progress, log)
    source = _as_source(model)
    manifest = read_manifest(bundle, verify_checksums=False)
    config = source.config
    cases = graph_cases(config, batch_sizes, seed)
    for spec in all_specs(config):
        progress(f"[verify] {spec.name}: {len(cases[spec.name])} cases")
        part = source.part(GRAPH_PARTS[spec.name])
        module = spec.module(part).eval()
        refs = [_torch_outputs(module, spec, feeds) for feeds in cases[spec.name]]
        del module, part
        gc.collect()
        with open_session(manifest.graph_path(spec.name), "onnxruntime") as sess:
            if spec.name == "text_decoder" and manifest.graph(spec.name).fused:  # the cases through its KV buffer
                from bridge_export.exporter.verify.fused import run_fused_cases

                gots, refs = run_fused_cases(sess, manifest.kv_layout, cases[spec.name], refs)
            else:
                gots = [sess.run(feeds) for feeds in cases[spec.name]]
        gc.collect()
        for i, (feeds, ref, got) in enumerate(zip(cases[spec.name], refs, gots)):
            shape = "x".join(str(d) for d in next(iter(feeds.values())).shape)
            for name in ref:
                report.outputs.append(compare(f"{spec.name}[{i}] {shape}", name, ref[name], got[name],
                                              spec.tolerance["atol"], spec.tolerance["rtol"], 0.9999))
        if use_polygraphy:
            ok = _polygraphy_accuracy(spec, refs, gots)
            if ok is not None:
                report.polygraphy[spec.name] = ok


class _CachedVision(torch.nn.Module):
    """Stands in for the vision tower with its already computed output (the tower itself is freed)."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, pixel_values):
        return self.hidden


def _e2e_inputs(config, seed: int):
    q = config.qllama
    rng = np.random.default_rng(seed + 10)
    s = config.image_size
    pix = rng.standard_normal((2, 3, s, s), dtype=np.float32)
    ids = rng.integers(3, q.vocab_size, (3, 9)).astype(np.int64)
    ids[:, 0] = q.bos_token_id
    ids[0, 5:] = 0
    ids[0, 4] = q.eos_token_id
    ids[2, -1] = q.eos_token_id
    prompt = np.array([[q.bos_token_id] + list(rng.integers(3, q.vocab_size, 3))], np.int64)
    return pix, ids, np.repeat(prompt, 2, 0)


def _reference_end_to_end(source: ReferenceSource, pix, ids, prompts, max_new_tokens: int, beams=(1, 3)) -> dict:
    """The reference's end-to-end outputs, with the vision tower and the language side loaded in turn."""
    tp, ti = torch.from_numpy(pix), torch.from_numpy(ids)
    vision = source.part(VISION_PART)
    with torch.no_grad():
        hidden = vision.vision_features(tp)
        out = {"image_embeds C": vision.clip_projector(hidden)}
    del vision
    gc.collect()
    lang = source.part(LANGUAGE_PART)
    tower = lang.vision_model  # a model given by the caller must come back unchanged
    lang.vision_model = _CachedVision(hidden)
    try:
        out.update(_language_outputs(lang, hidden, out["image_embeds C"], tp, ti, prompts, max_new_tokens, beams))
    finally:
        lang.vision_model = tower
    del lang, tower
    gc.collect()
    return {k: v.numpy() for k, v in out.items()}


def _language_outputs(lang, hidden, c, tp, ti, prompts, max_new_tokens: int, beams) -> dict:
    out = {"image_embeds C": c}
    with torch.no_grad():
        g = lang.clip_projector2(lang.query_features(hidden)[0])
        out["image_embeds G"] = c / c.norm(dim=1, keepdim=True) + g / g.norm(dim=1, keepdim=True)
        out["text_embeds"] = lang.encode_text(ti)
        txt = out["text_embeds"] / out["text_embeds"].norm(dim=1, keepdim=True)
        for m in "CG":
            img = out[f"image_embeds {m}"] / out[f"image_embeds {m}"].norm(dim=1, keepdim=True)
            out[f"logits_per_image {m}"] = lang.logit_scale.exp() * img @ txt.t()
        for b in beams:
            out[f"tokens {b}"] = lang.generate(tp, torch.from_numpy(prompts), max_new_tokens=max_new_tokens,
                                               num_beams=b)
    return out


def verify_end_to_end(bundle, model, report: VerifyReport, cosine_min: float = 0.99999,
                      seed: int = 0, max_new_tokens: int = 8, progress=None, beams=(1, 3),
                      one_session_at_a_time: bool = True) -> None:
    """Embeddings, similarity and greedy/beam tokens through the runtime pipeline.

    The reference runs first (vision tower, then the language side), then the runtime Pipeline with
    one graph session open at a time (re-opened as the pipeline moves between graphs; pass
    one_session_at_a_time=False to open all three once when memory allows), so neither side's
    memory stacks on the other's.
    """
    from bridge_export.runtime.manifest import read_manifest
    from bridge_export.runtime.pipeline import Pipeline
    from bridge_export.runtime.text import TextCodec

    progress = reporter(progress, log)
    source = _as_source(model)
    pix, ids, prompts = _e2e_inputs(source.config, seed)
    ref = _reference_end_to_end(source, pix, ids, prompts, max_new_tokens, beams)
    if one_session_at_a_time:
        manifest = read_manifest(bundle, verify_checksums=False)
        sessions = OneSessionAtATime(manifest, on_open=lambda n: progress(f"[verify] end to end: opening {n}"))
        pipeline = Pipeline(manifest, sessions, TextCodec.from_manifest(manifest))
    else:
        from bridge_export import runtime

        pipeline = runtime.load(bundle)
    with pipeline as pipe:
        got = {f"image_embeds {m[-1]}": pipe.encode_image(pix, m) for m in ("InternVL-C", "InternVL-G")}
        got["text_embeds"] = pipe.encode_text(ids)
        for m in "CG":
            got[f"logits_per_image {m}"] = (np.exp(pipe.logit_scale) * normalize(got[f"image_embeds {m}"])
                                            @ normalize(got["text_embeds"]).T)
        for b in beams:
            got[f"tokens {b}"] = pipe.generate(pix, prompts, max_new_tokens=max_new_tokens, num_beams=b)
    for name in ("image_embeds C", "image_embeds G", "text_embeds"):
        report.outputs.append(compare("end-to-end", name, ref[name], got[name], 1e-3, 1e-3, cosine_min))
    for m in "CG":
        name = f"logits_per_image {m}"
        report.outputs.append(compare("end-to-end", name, ref[name], got[name], 1e-3, 1e-4, cosine_min))
    for b in beams:
        r, g = ref[f"tokens {b}"], got[f"tokens {b}"]
        report.tokens.append(TokenCheck("greedy" if b == 1 else f"beam{b}", r.tolist(), g.tolist(),
                                        np.array_equal(r, g)))


def verify_bundle(bundle, model, cosine_min: float = 0.99999, batch_sizes=(1, 2), seed: int = 0,
                  use_polygraphy: bool = True, progress=None) -> VerifyReport:
    """Verify an fp32 bundle against `model` (an InternVLModel, or a ReferenceSource that loads only the
    parts each check needs): every graph, then end to end. See VerifyReport.passed."""
    progress = reporter(progress, log)
    report = VerifyReport()
    verify_graphs(bundle, model, report, batch_sizes, seed, use_polygraphy, progress)
    progress("[verify] end to end: embeddings, similarity, greedy and beam captions")
    verify_end_to_end(bundle, model, report, cosine_min, seed, progress=progress)
    return report
