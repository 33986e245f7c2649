"""Parity verification: every graph and the end-to-end pipeline against the PyTorch reference.

A library function (`verify_bundle`) that the CLI and the tests both call. Graph-level checks
run Polygraphy's Comparator (a PyTorch runner beside its onnxruntime runner) when Polygraphy
is installed, and always compute max abs/rel error and cosine per output.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

import runtime
from reference_model.model import InternVLModel

from runtime.numeric import min_row_cosine, normalize
from runtime.progress import get_logger, reporter

from .specs import all_specs, kv_layout

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


def _polygraphy_compare(module, spec, path, cases) -> bool | None:
    try:
        from polygraphy.backend.base import BaseRunner
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
        from polygraphy.comparator import Comparator, SimpleCompareFunc
    except ImportError:
        return None

    class TorchRunner(BaseRunner):
        def infer_impl(self, feed_dict):
            t0 = time.perf_counter()
            out = _torch_outputs(module, spec, feed_dict)
            self.inference_time = time.perf_counter() - t0  # Comparator.run reads it
            return out

        def get_input_metadata_impl(self):
            from polygraphy.common import TensorMetadata

            meta = TensorMetadata()
            for t in spec.inputs:
                meta.add(t.name, np.dtype(t.dtype), [d if isinstance(d, int) else -1 for d in t.shape])
            return meta

    import logging

    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    logging.getLogger("polygraphy").setLevel(logging.ERROR)
    runners = [TorchRunner(name="pytorch"), OnnxrtRunner(SessionFromOnnx(str(path)), name="onnxruntime")]
    results = Comparator.run(runners, data_loader=cases)
    tol = spec.tolerance
    return bool(Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=tol["atol"], rtol=tol["rtol"])))


def verify_graphs(bundle, model: InternVLModel, report: VerifyReport, batch_sizes=(1, 2), seed: int = 0,
                  use_polygraphy: bool = True, progress=None) -> None:
    """Each graph on onnxruntime against its PyTorch module on the same feeds."""
    progress = reporter(progress, log)
    pipe = runtime.load(bundle)
    config = model.config
    cases = graph_cases(config, batch_sizes, seed)
    for spec in all_specs(config):
        progress(f"[verify] {spec.name}: {len(cases[spec.name])} cases")
        module = spec.module(model).eval()
        sess = pipe.sessions[spec.name]
        for i, feeds in enumerate(cases[spec.name]):
            ref = _torch_outputs(module, spec, feeds)
            got = sess.run(feeds)
            shape = "x".join(str(d) for d in next(iter(feeds.values())).shape)
            for name in ref:
                report.outputs.append(compare(f"{spec.name}[{i}] {shape}", name, ref[name], got[name],
                                              spec.tolerance["atol"], spec.tolerance["rtol"], 0.9999))
        if use_polygraphy:
            ok = _polygraphy_compare(module, spec, pipe.manifest.graph_path(spec.name), cases[spec.name])
            if ok is not None:
                report.polygraphy[spec.name] = ok
    pipe.close()


def verify_end_to_end(bundle, model: InternVLModel, report: VerifyReport, cosine_min: float = 0.99999,
                      seed: int = 0, max_new_tokens: int = 8) -> None:
    """Embeddings, similarity and greedy/beam tokens through the runtime pipeline."""
    pipe = runtime.load(bundle, verify_checksums=False)
    config = model.config
    q = config.qllama
    rng = np.random.default_rng(seed + 10)
    s = config.image_size
    pix = rng.standard_normal((2, 3, s, s), dtype=np.float32)
    ids = rng.integers(3, q.vocab_size, (3, 9)).astype(np.int64)
    ids[:, 0] = q.bos_token_id
    ids[0, 5:] = 0
    ids[0, 4] = q.eos_token_id
    ids[2, -1] = q.eos_token_id
    tp, ti = torch.from_numpy(pix), torch.from_numpy(ids)
    for mode in ("InternVL-C", "InternVL-G"):
        report.outputs.append(compare("end-to-end", f"image_embeds {mode[-1]}", model.encode_image(tp, mode).numpy(),
                                      pipe.encode_image(pix, mode), 1e-3, 1e-3, cosine_min))
    report.outputs.append(compare("end-to-end", "text_embeds", model.encode_text(ti).numpy(), pipe.encode_text(ids),
                                  1e-3, 1e-3, cosine_min))
    for mode in ("InternVL-C", "InternVL-G"):
        ref = model(tp, ti, mode)[0].numpy()
        img, txt = pipe.encode_image(pix, mode), pipe.encode_text(ids)
        got = np.exp(pipe.logit_scale) * normalize(img) @ normalize(txt).T
        report.outputs.append(compare("end-to-end", f"logits_per_image {mode[-1]}", ref, got, 1e-3, 1e-4, cosine_min))
    prompt = np.array([[q.bos_token_id] + list(rng.integers(3, q.vocab_size, 3))], np.int64)
    prompts = np.repeat(prompt, 2, 0)
    for beams in (1, 3):
        ref = model.generate(tp, torch.from_numpy(prompts), max_new_tokens=max_new_tokens, num_beams=beams).numpy()
        got = pipe.generate(pix, prompts, max_new_tokens=max_new_tokens, num_beams=beams)
        name = "greedy" if beams == 1 else f"beam{beams}"
        report.tokens.append(TokenCheck(name, ref.tolist(), got.tolist(), np.array_equal(ref, got)))
    pipe.close()


def verify_bundle(bundle, model: InternVLModel, cosine_min: float = 0.99999, batch_sizes=(1, 2), seed: int = 0,
                  use_polygraphy: bool = True, progress=None) -> VerifyReport:
    """Verify an fp32 bundle against `model`: every graph, then end to end. See VerifyReport.passed."""
    progress = reporter(progress, log)
    report = VerifyReport()
    model = model.float().eval()
    verify_graphs(bundle, model, report, batch_sizes, seed, use_polygraphy, progress)
    progress("[verify] end to end: embeddings, similarity, greedy and beam captions")
    verify_end_to_end(bundle, model, report, cosine_min, seed)
    return report
