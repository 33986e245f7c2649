"""Engine build and the TensorRT backend: need TensorRT and an NVIDIA GPU, skipped here with the reason."""
import numpy as np
import pytest


def _trt_or_skip():
    try:
        import tensorrt as trt
    except ImportError:
        pytest.skip("TensorRT is not installed (its PyPI wheel needs NVIDIA's index and a GPU machine)")
    try:
        trt.Builder(trt.Logger(trt.Logger.ERROR))
        from bridge_export.runtime.gpu.cuda import device_info

        device_info()
    except Exception as e:  # no driver / no GPU: "CUDA initialization failure"
        pytest.skip(f"no usable NVIDIA GPU for TensorRT: {e}")
    return trt


pytestmark = pytest.mark.tensorrt


def test_build_and_run_engines_match_onnxruntime(tiny_bundle, tmp_path):
    _trt_or_skip()
    from bridge_export import runtime
    from bridge_export.exporter.tensorrt.engines import EngineOptions, build_engines

    out = tiny_bundle / "engines"
    built = build_engines(tiny_bundle, out, EngineOptions(max_batch=4, timing_cache=tmp_path / "tc.bin"))
    assert [p.name for p in built] == ["vision_encoder.engine", "query_bridge.engine", "text_decoder.engine"]
    assert (tmp_path / "tc.bin").stat().st_size > 0
    with runtime.load(tiny_bundle) as ort, runtime.load(tiny_bundle, backend="tensorrt") as trt_pipe:
        x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
        np.testing.assert_allclose(trt_pipe.encode_image(x, "InternVL-G"), ort.encode_image(x, "InternVL-G"),
                                   atol=1e-3)
        ids = np.array([[1, 5, 9, 2, 0], [1, 7, 8, 9, 2]])
        np.testing.assert_allclose(trt_pipe.encode_text(ids), ort.encode_text(ids), atol=1e-3)
        prompt = np.array([[1, 5, 6, 7]] * 2)
        for beams in (1, 3):
            np.testing.assert_array_equal(trt_pipe.generate(x, prompt, max_new_tokens=8, num_beams=beams),
                                          ort.generate(x, prompt, max_new_tokens=8, num_beams=beams))
        # per decode step only ids, positions and mask go up and the logits come down, at any past length
        with trt_pipe._decoder(x, prompt, None, 8, 3) as dec:
            dec.prefill()
            dec.expand(3)
            moved = set()
            for _ in range(8):
                snap = trt_pipe.memory.traffic.snapshot()
                logits = dec.step(np.array([5, 6, 7, 5, 6, 7]), np.array([0, 0, 1, 3, 5, 4]))
                d = trt_pipe.memory.traffic - snap
                moved.add((d.up, d.down))
            assert moved == {(6 * 8 * (dec.cache.capacity + 3), logits.nbytes)}


def test_engine_from_other_tensorrt_version_is_refused(tiny_bundle, tmp_path):
    trt = _trt_or_skip()
    import json
    import shutil

    from bridge_export.exporter.tensorrt.engines import EngineOptions, build_engines
    from bridge_export.runtime.gpu.trt_compat import EngineMismatch
    from bridge_export.runtime.gpu.trt_session import TrtSession

    out = tmp_path / "eng"
    build_engines(tiny_bundle, out, EngineOptions(graphs=["vision_encoder"]))
    side = json.loads((out / "vision_encoder.json").read_text())
    side["tensorrt_version"] = "9.0.0"
    (out / "vision_encoder.json").write_text(json.dumps(side))
    with pytest.raises(EngineMismatch, match=f"built by TensorRT 9.0.0 but this is TensorRT {trt.__version__}"):
        TrtSession(out / "vision_encoder.engine")
    shutil.rmtree(out)
