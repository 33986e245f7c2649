"""Everything around TensorRT, tested without it: profiles, precision plans, trtexec, sidecars, mismatches."""
import json

import numpy as np
import pytest

from bridge_export.exporter.tensorrt.engines import EngineOptions, engine_profiles, precision_plan, sidecar, trtexec_command, \
    write_trtexec_script
from bridge_export.runtime.gpu.kv_cache import kv_slot_geometry
from bridge_export.runtime.manifest import read_manifest
from bridge_export.runtime.gpu.trt_compat import EngineMismatch, check_engine_compat, read_sidecar
from bridge_export.runtime.gpu.trt_session import pick_profile


def test_profiles_respect_user_limits(tiny_bundle):
    man = read_manifest(tiny_bundle, verify_checksums=False)
    prof = engine_profiles(man, "text_decoder", EngineOptions(max_batch=2, max_seq=64))
    assert len(prof) == 2
    prefill, decode = prof
    assert prefill["input_ids"][2] == [2, 64] and decode["input_ids"][2] == [2, 1]
    for p in prof:  # every dynamic input has min <= opt <= max
        for name, (mn, opt, mx) in p.items():
            assert all(a <= b <= c for a, b, c in zip(mn, opt, mx)), name
    vis = engine_profiles(man, "vision_encoder", EngineOptions(max_batch=16))[0]["pixel_values"]
    assert vis == ([1, 3, 32, 32], [8, 3, 32, 32], [16, 3, 32, 32])


@pytest.mark.parametrize("major", [10, 11])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "fp8"])
def test_strongly_typed_on_tensorrt_10_and_11(major, precision):
    """The graph's types are the engine's: no precision builder flags, TF32 off, trtexec --stronglyTyped only."""
    plan = precision_plan(major, precision, fp32_layers=["/norm/ReduceMean"])
    assert plan == {"typing": "strong", "strongly_typed": True, "builder_flags": [], "pinned_fp32": [],
                    "trtexec_flags": ["--stronglyTyped", "--noTF32"], "fallback": None}


def test_weakly_typed_fallback_pins_the_fp32_islands():
    plan = precision_plan(10, "fp16", fp32_layers=["b/Softmax", "a/norm"], fallback="a layer failed")
    assert plan["typing"] == "weak" and plan["fallback"] == "a layer failed"
    assert plan["builder_flags"] == ["FP16", "OBEY_PRECISION_CONSTRAINTS"] and plan["pinned_fp32"] == ["a/norm", "b/Softmax"]
    assert plan["trtexec_flags"] == ["--fp16", "--noTF32", "--precisionConstraints=obey",
                                     "--layerPrecisions=a/norm:fp32,b/Softmax:fp32",
                                     "--layerOutputTypes=a/norm:fp32,b/Softmax:fp32"]
    # int8 / fp8: only their own flag, so the unquantized layers stay fp32 as in the strongly typed build
    assert precision_plan(10, "int8", ["x"], fallback="f")["builder_flags"] == ["INT8"]
    assert precision_plan(10, "fp8", ["x"], fallback="f")["trtexec_flags"] == ["--fp8", "--noTF32"]
    old = precision_plan(8, "fp16", ["n"])  # TensorRT 8.6 (JetPack 5): no strongly typed networks
    assert old["typing"] == "weak" and "has no strongly typed" in old["fallback"] and old["pinned_fp32"] == ["n"]
    with pytest.raises(ValueError, match="TensorRT 11.x builds strongly typed networks only"):
        precision_plan(11, "fp16", ["n"], fallback="failed")
    with pytest.raises(ValueError, match="fp8 .* need TensorRT 10 or newer"):
        precision_plan(8, "fp8")


def test_onnxruntime_only_precisions_refused():
    with pytest.raises(ValueError, match="MatMulInteger"):
        precision_plan(10, "int8-cpu")
    with pytest.raises(ValueError, match="int4-cpu bundle is onnxruntime-only"):
        precision_plan(11, "int4-cpu")


def test_trtexec_script(tiny_bundle, tmp_path):
    opts = EngineOptions(max_batch=4, timing_cache=tmp_path / "tc.bin", version_compatible=True)
    path = write_trtexec_script(tiny_bundle, tmp_path / "eng", opts)
    text = path.read_text()
    assert text.count("trtexec ") == 3
    dec = next(line for line in text.splitlines() if "text_decoder.onnx" in line)
    assert dec.count("--minShapes=") == 2  # prefill and decode profiles
    assert "input_ids:1x1" in dec and "--versionCompatible" in dec and "--timingCacheFile=" in dec
    assert "--memPoolSize=workspace:4096M" in dec
    assert "--stronglyTyped" in dec and "--fp16" not in text
    cmd = trtexec_command("m.onnx", "m.engine", [{"x": ([1, 2], [2, 2], [4, 2])}], precision_plan(10, "fp16"),
                          EngineOptions())
    assert cmd == "trtexec --onnx=m.onnx --saveEngine=m.engine --memPoolSize=workspace:4096M " \
                  "--minShapes=x:1x2 --optShapes=x:2x2 --maxShapes=x:4x2 --stronglyTyped --noTF32"


def test_sidecar_and_mismatch_messages(tiny_bundle, tmp_path):
    man = read_manifest(tiny_bundle, verify_checksums=False)
    opts = EngineOptions()
    side = sidecar(man, "vision_encoder", "10.3.0", "Orin", "8.7",
                   engine_profiles(man, "vision_encoder", opts), precision_plan(10, "fp32"), opts)
    assert side["source_sha256"] == man.files["vision_encoder.onnx"].sha256 and side["precision"] == "fp32"
    (tmp_path / "vision_encoder.json").write_text(json.dumps(side))
    side = read_sidecar(tmp_path / "vision_encoder.engine")
    check_engine_compat(side, "10.3.1", "Orin", "8.7")  # same major.minor, same GPU: fine
    with pytest.raises(EngineMismatch, match=r"built by TensorRT 10.3.0 but this is TensorRT 11.0.0"):
        check_engine_compat(side, "11.0.0", "Orin", "8.7")
    with pytest.raises(EngineMismatch, match=r"built for Orin \(compute capability 8.7\) but this GPU is "
                                             r"NVIDIA H100 \(9.0\)"):
        check_engine_compat(side, "10.3.0", "NVIDIA H100", "9.0")
    check_engine_compat({**side, "hardware_compatible": True}, "10.3.0", "NVIDIA H100", "9.0")
    with pytest.raises(EngineMismatch, match="missing"):
        read_sidecar(tmp_path / "other.engine")


def test_profile_choice_and_cache_copy_geometry():
    profiles = [{"input_ids": [[1, 1], [2, 32], [4, 64]]}, {"input_ids": [[1, 1], [2, 1], [4, 1]]}]
    assert pick_profile(profiles, {"input_ids": (2, 7)}) == 0
    assert pick_profile(profiles, {"input_ids": (3, 1)}) == 0  # first profile that fits
    with pytest.raises(ValueError, match="--max-batch"):
        pick_profile(profiles, {"input_ids": (8, 1)})
    # the 2-D copy the device cache uses writes exactly the numpy slice buf[:, :, s:s+T]
    rows, H, C, Dh, start, T = 2, 3, 10, 4, 6, 2
    buf = np.zeros((rows, H, C, Dh), np.float32)
    new = np.arange(rows * H * T * Dh, dtype=np.float32).reshape(rows, H, T, Dh)
    g = kv_slot_geometry(H, C, Dh, start, T, rows=rows)
    flat, src = buf.reshape(-1).view(np.uint8), new.reshape(-1).view(np.uint8)
    for h in range(g["height"]):
        d0 = g["dst_offset"] + h * g["dpitch"]
        flat[d0:d0 + g["width"]] = src[h * g["spitch"]:h * g["spitch"] + g["width"]]
    expect = np.zeros_like(buf)
    expect[:, :, start:start + T] = new
    np.testing.assert_array_equal(buf, expect)


def test_stored_profiles_equal_recomputed_ones(tiny_bundle, tiny_model):
    """`engine` reads the manifest's profiles; recomputing them torch-free from its dims gives the same."""
    from bridge_export.exporter.tensorrt.profiles import graph_profiles
    from bridge_export.exporter.export.specs import all_specs

    man = read_manifest(tiny_bundle)
    for spec in all_specs(tiny_model.config):
        stored = engine_profiles(man, spec.name, EngineOptions())
        assert stored == graph_profiles(spec.name, man.dims, man.kv_layout, man.limits)
        assert stored == spec.profiles(tiny_model.config, man.limits)


def test_emit_trtexec_without_torch(tiny_bundle, tmp_path):
    """The Jetson path: `engine --emit-trtexec` with torch made unimportable."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "onnx", "reference_model"):
                    raise ImportError(name + " is blocked in this test")
        sys.meta_path.insert(0, Block())
        from bridge_export.exporter.cli import main
        main(["engine", {str(tiny_bundle)!r}, "--emit-trtexec", "--max-batch", "2", "--out", {str(tmp_path)!r}])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    text = (tmp_path / "build_engines.sh").read_text()
    assert text.count("trtexec ") == 3 and "--maxShapes=pixel_values:2x3x32x32" in text


def test_trtexec_engines_get_a_sidecar_stamped_on_the_device(tiny_bundle, tmp_path, capsys):
    """The script writes a sidecar template per graph and stamps it after each trtexec build, so an engine
    built by the script is accepted by the runtime like one from `bridge-export engine`."""
    from bridge_export.runtime.gpu.trt_compat import TEMPLATE_SUFFIX, main, stamp_sidecar

    out = tmp_path / "eng"
    script = write_trtexec_script(tiny_bundle, out, EngineOptions(max_batch=2), trt_major=10).read_text()
    for g in ("vision_encoder", "query_bridge", "text_decoder"):
        stamp = f'"${{PYTHON:-python3}}" -m bridge_export.runtime.gpu.trt_compat stamp {g}{TEMPLATE_SUFFIX}'
        lines = script.splitlines()
        build = next(i for i, line in enumerate(lines) if line.startswith("trtexec ") and f"/{g}.onnx" in line)
        assert lines[build + 1] == stamp  # right after its build (set -e: only when trtexec succeeded)
        assert (out / f"{g}{TEMPLATE_SUFFIX}").is_file()
    template = out / f"text_decoder{TEMPLATE_SUFFIX}"
    with pytest.raises(EngineMismatch, match="text_decoder.engine is missing"):
        stamp_sidecar(template, "10.3.0", "Orin", "8.7")
    (out / "text_decoder.engine").write_bytes(b"plan")
    with pytest.raises(EngineMismatch, match="written for TensorRT 10.x but this is TensorRT 11.0.1"):
        stamp_sidecar(template, "11.0.1", "Orin", "8.7")
    path = stamp_sidecar(template, "10.3.0", "Orin", "8.7")
    side = read_sidecar(out / "text_decoder.engine")
    assert path == out / "text_decoder.json" and side["tensorrt_version"] == "10.3.0" and side["gpu"] == "Orin"
    assert "tensorrt_major" not in side and len(side["profiles"]) == 2 and side["builder_flags"] == []
    man = read_manifest(tiny_bundle, verify_checksums=False)
    assert side["source_sha256"] == man.files["text_decoder.onnx"].sha256
    check_engine_compat(side, "10.3.1", "Orin", "8.7")
    with pytest.raises(EngineMismatch, match="not a sidecar template"):
        stamp_sidecar(out / "text_decoder.json", "10.3.0", "Orin", "8.7")
    assert main(["stamp"]) == 2
    try:
        import tensorrt  # noqa: F401
    except ImportError:  # here: the stamp step says in one line what is missing
        assert main(["stamp", str(template)]) == 1
        err = capsys.readouterr().err.strip()
        assert "TensorRT's Python package is not importable" in err and "\n" not in err
    # written for TensorRT 11: strongly typed, no precision flags
    t11 = write_trtexec_script(tiny_bundle, tmp_path / "e11", EngineOptions(), trt_major=11)
    assert "--stronglyTyped" in t11.read_text()
    assert json.loads((tmp_path / "e11" / f"vision_encoder{TEMPLATE_SUFFIX}").read_text())["strongly_typed"] is True
