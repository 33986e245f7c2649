"""Accuracy-targeted INT8: on a checkpoint it was not tuned on, with random calibration images, every
output meets the target on held-out inputs while most MatMuls stay quantized, and the bundle says so."""
import os

import numpy as np
import onnx
import pytest

from bridge_export import runtime
from bridge_export.exporter.quantize.accuracy import min_row_cosine
from bridge_export.exporter.export.checks import check_graph
from bridge_export.runtime.manifest import read_manifest

GRAPHS = ("vision_encoder", "query_bridge", "text_decoder")


def _calib_dir(root, size, n=8, seed=11):
    from PIL import Image

    from bridge_export.exporter.quantize.calibration import synthetic_images

    root.mkdir()
    for i, im in enumerate(synthetic_images(n, size, seed=seed)):
        Image.fromarray((im * 255).astype(np.uint8)).save(root / f"{i}.png")
    return root


def _targeted(tmp_path, model, target):
    from bridge_export.exporter.export.bundle import export_bundle
    from bridge_export.exporter.quantize.precision import make_precision_bundle

    fp32 = export_bundle(model, tmp_path / "fp32", progress=lambda s: None)
    calib = _calib_dir(tmp_path / "calib", model.config.image_size)
    out = make_precision_bundle(fp32, tmp_path / "int8", "int8", calib=calib, target_cosine=target,
                                progress=lambda s: None)
    return fp32, out


def _check_targeted(fp32, out, target, min_quantized=0.5):
    man = read_manifest(out)
    rep = man.precision.accuracy
    assert rep["target_cosine"] == target and rep["met_target"] is True
    summary = man.precision.report
    assert summary["met_target"] is True and summary["lowest_cosine"]["cosine"] >= target
    assert set(summary["kept_fp32_for_target"]) == set(GRAPHS)
    for g in GRAPHS:
        outs = man.graphs[g].report["outputs"]
        assert outs and min(outs.values()) >= target, (g, outs)
        how = man.graphs[g].how
        assert how["target_cosine"] is not None and "kept_fp32_for_target" in how and how.get("met", True) is True
        check_graph(out / f"{g}.onnx", tensorrt=True)  # symmetric Q/DQ, opset <= 20, TensorRT ops
        assert next(o.version for o in onnx.load(str(out / f"{g}.onnx"), load_external_data=False).opset_import
                    if o.domain in ("", "ai.onnx")) <= 20
    for k in ("image_embeds_C_cosine", "image_embeds_G_cosine", "text_embeds_cosine", "logits_cosine"):
        assert rep["end_to_end"][k] >= target, (k, rep["end_to_end"])
    q = sum(man.graphs[g].how["quantized_nodes"] for g in GRAPHS)
    total = q + sum(man.graphs[g].how["excluded_nodes"] for g in GRAPHS)
    assert q / total >= min_quantized, f"only {q} of {total} MatMuls quantized"
    # fresh inputs the search never saw: still close
    ref, new = runtime.load(fp32), runtime.load(out)
    s = ref.preprocessing.image_size
    x = np.random.default_rng(123).standard_normal((3, 3, s, s), dtype=np.float32)
    for mode in ("InternVL-C", "InternVL-G"):
        assert min_row_cosine(ref.encode_image(x, mode), new.encode_image(x, mode)) >= target - 0.002
    ids = np.array([[1, 9, 33, 17, 2, 0], [1, 40, 41, 42, 43, 2]])
    assert min_row_cosine(ref.encode_text(ids), new.encode_text(ids)) >= target - 0.002


def test_target_met_on_another_seed_with_random_images(tmp_path):
    from bridge_export import reference_model

    fp32, out = _targeted(tmp_path, reference_model.from_preset("tiny", seed=7), 0.999)
    _check_targeted(fp32, out, 0.999)


def test_without_target_reports_each_output_and_warns(tiny_bundle, tmp_path):
    from bridge_export.exporter.quantize.precision import make_precision_bundle

    said = []
    out = make_precision_bundle(tiny_bundle, tmp_path / "q", "int8", calib=_calib_dir(tmp_path / "c", 32),
                                progress=said.append)
    man = read_manifest(out)
    outs = man.graphs["text_decoder"].report["outputs"]
    assert {"logits", "hidden_states", "present.0.key"} <= set(outs)
    assert man.graphs["text_decoder"].how["kept_fp32_for_target"] == []
    report = "\n".join(said)
    assert "image_embeds_g" in report and "logits_cosine" in report
    worst = min(min(g.report["outputs"].values()) for g in man.graphs.values())
    assert ("warning:" in report) == (min(worst, *[v for k, v in man.precision.accuracy["end_to_end"].items()
                                                    if k.endswith("_cosine")]) < 0.99)


def test_target_cosine_rejected_where_it_does_not_apply(tiny_bundle, tmp_path):
    from bridge_export.exporter.quantize.precision import make_precision_bundle

    with pytest.raises(ValueError, match="applies to --precision int8"):
        make_precision_bundle(tiny_bundle, tmp_path / "a", "int8-cpu", target_cosine=0.99)
    with pytest.raises(ValueError, match="between 0 and 1"):
        make_precision_bundle(tiny_bundle, tmp_path / "b", "int8", calib=tmp_path, target_cosine=1.5)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("BRIDGE_EXPORT_SLOW") != "1", reason="slow (minutes): set BRIDGE_EXPORT_SLOW=1")
# small at 0.999: met, but only 40 of 162 MatMuls stayed quantized (README): with random weights every
# node is about equally sensitive (~35 dB) and the errors add up over its 8 QLLaMA layers (all
# quantized, the decoder's worst output is 0.9946), so that target needs most nodes in fp32.
@pytest.mark.parametrize("preset,seed,widths,target", [("small", 1, None, 0.995),
                                                       ("tiny", 3, {"hidden_size": 96, "intermediate_size": 256}, 0.999)])
def test_target_met_on_other_sizes(tmp_path, preset, seed, widths, target):
    import dataclasses

    from bridge_export import reference_model
    from bridge_export.reference_model.config import preset_config
    from bridge_export.reference_model.loading import init_weights

    cfg = preset_config(preset)
    if widths:  # custom widths: a checkpoint size no preset has
        cfg = dataclasses.replace(cfg, qllama=dataclasses.replace(cfg.qllama, **widths))
    model = reference_model.InternVLModel(cfg)
    init_weights(model, seed)
    model.eval()
    fp32, out = _targeted(tmp_path, model, target)
    _check_targeted(fp32, out, target)
