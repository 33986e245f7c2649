"""`engine` through Polygraphy's loaders, checked without TensorRT: a stand-in `tensorrt` module gives the
version and enums, the loader chain is built and inspected, and the build step is replaced to see the fallback,
the sidecar and the fp8 refusal."""
import json
import shutil
import sys
import types

import pytest

from bridge_export.exporter.errors import ExportError
from bridge_export.exporter.export.bundle import write_manifest
from bridge_export.exporter.tensorrt import engines
from bridge_export.exporter.tensorrt.engines import EngineOptions, build_engines, engine_loader, precision_plan, \
    write_trtexec_script
from bridge_export.runtime.gpu.trt_compat import EngineMismatch, main as trt_compat_main, require_compute_capability
from bridge_export.runtime.manifest import read_manifest


def fake_trt(version="10.3.0"):
    """The few names of the tensorrt module the loaders are configured with (enums only)."""
    return types.SimpleNamespace(
        __version__=version,
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
        HardwareCompatibilityLevel=types.SimpleNamespace(AMPERE_PLUS="AMPERE_PLUS"))


def as_precision(src, dst, mode, fp32_names=None):
    """A copy of bundle `src` relabelled as `mode` (the graphs are unchanged: these tests never build)."""
    shutil.copytree(src, dst)
    man = read_manifest(dst)
    man.precision.mode = mode
    for g in man.graphs.values():
        g.precision = mode
        if fp32_names is not None:
            g.how = {"fp32_node_names": fp32_names}
    write_manifest(dst, man, known={n: e.sha256 for n, e in man.files.items()})
    return dst


def test_loader_chain_strongly_typed(tmp_path):
    prof = [{"x": ([1, 2], [2, 2], [4, 2])}]
    opts = EngineOptions(workspace_gib=1.0, timing_cache=tmp_path / "tc.bin", hardware_compatible=True)
    save = engine_loader(fake_trt(), "g.onnx", tmp_path / "g.engine", prof, precision_plan(10, "fp16"), opts)
    assert save.path == str(tmp_path / "g.engine")
    build = save._engine
    network, config = build._network, build._config
    assert type(network).__name__ == "NetworkFromOnnxPath" and network.strongly_typed
    assert not (config.fp16 or config.int8 or config.fp8 or config.tf32) and config.precision_constraints is None
    assert config.memory_pool_limits == {"WORKSPACE": 1 << 30}
    assert config.hardware_compatibility_level == "AMPERE_PLUS"
    assert config.timing_cache_path is None and build.timing_cache_path == str(tmp_path / "tc.bin")  # created
    (p,) = config.profiles
    assert (list(p["x"].min), list(p["x"].opt), list(p["x"].max)) == ([1, 2], [2, 2], [4, 2])


def test_loader_chain_weak_fallback_pins_layers(tmp_path):
    plan = precision_plan(10, "fp16", ["n1", "n2"], fallback="x")
    save = engine_loader(fake_trt(), "g.onnx", tmp_path / "g.engine", [{"x": ([1], [1], [1])}], plan, EngineOptions())
    network, config = save._engine._network, save._engine._config
    assert type(network).__name__ == "PostprocessNetwork" and not network._network.strongly_typed
    assert config.fp16 and not config.int8 and config.precision_constraints == "obey"
    # the pinning function sets fp32 compute and fp32 float outputs on exactly the named layers
    dt = types.SimpleNamespace(float32="f32", float16="f16", int64="i64")
    sys.modules["tensorrt"], saved = dt, sys.modules.get("tensorrt")
    try:
        class Layer:
            def __init__(self, name, dtypes):
                self.name, self.precision, self.types = name, None, list(dtypes)
                self.num_outputs = len(dtypes)

            def get_output(self, i):
                return types.SimpleNamespace(dtype=self.types[i])

            def set_output_type(self, i, t):
                self.types[i] = t

        layers = [Layer("n1", ["f16", "i64"]), Layer("n2", ["f16"]), Layer("other", ["f16"])]
        network._func(network=layers)
    finally:
        sys.modules.pop("tensorrt")
        if saved is not None:
            sys.modules["tensorrt"] = saved
    assert [(l.precision, l.types) for l in layers] == [("f32", ["f32", "i64"]), ("f32", ["f32"]), (None, ["f16"])]


def _fake_build_env(monkeypatch, version="10.3.0", cc="8.7", fail_strong=False):
    calls = []

    def fake_build(trt, onnx_path, path, profiles, plan, opts):
        calls.append(plan)
        if fail_strong and plan["strongly_typed"]:
            raise ExportError("TensorRT failed to build text_decoder (strongly typed): unsupported layer")
        path.write_bytes(b"plan")

    import bridge_export.runtime.gpu.cuda as cuda

    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt(version))
    monkeypatch.setattr(cuda, "device_info", lambda i=0: ("GPU", cc))
    monkeypatch.setattr(engines, "_build", fake_build)
    return calls


def test_build_is_strongly_typed_and_says_so(tiny_bundle, tmp_path, monkeypatch):
    bundle = as_precision(tiny_bundle, tmp_path / "b16", "fp16", ["/a/norm"])
    calls = _fake_build_env(monkeypatch)
    built = build_engines(bundle, tmp_path / "eng", EngineOptions(graphs=["text_decoder"]))
    assert [c["typing"] for c in calls] == ["strong"]
    side = json.loads(built[0].with_suffix(".json").read_text())
    assert side["typing"] == "strong" and side["typing_fallback"] is None and side["builder_flags"] == []


def test_failed_strong_build_falls_back_weak_with_pins(tiny_bundle, tmp_path, monkeypatch):
    bundle = as_precision(tiny_bundle, tmp_path / "b16", "fp16", ["/a/norm", "/b/Softmax"])
    calls, said = _fake_build_env(monkeypatch, fail_strong=True), []
    built = build_engines(bundle, tmp_path / "eng", EngineOptions(graphs=["text_decoder"]), progress=said.append)
    assert [c["typing"] for c in calls] == ["strong", "weak"]
    assert calls[1]["pinned_fp32"] == ["/a/norm", "/b/Softmax"]
    side = json.loads(built[0].with_suffix(".json").read_text())
    assert side["typing"] == "weak" and "unsupported layer" in side["typing_fallback"]
    assert side["pinned_fp32_layers"] == 2 and side["builder_flags"] == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
    assert any("building weakly typed with 2 fp32 layer(s) pinned" in line for line in said)


def test_tensorrt_11_has_no_weak_fallback(tiny_bundle, tmp_path, monkeypatch):
    bundle = as_precision(tiny_bundle, tmp_path / "b16", "fp16", ["/a/norm"])
    _fake_build_env(monkeypatch, version="11.0.0", fail_strong=True)
    with pytest.raises(ExportError, match="unsupported layer"):
        build_engines(bundle, tmp_path / "eng", EngineOptions(graphs=["text_decoder"]))


def test_fp8_refused_below_compute_capability_8_9(tiny_bundle, tmp_path, monkeypatch):
    bundle = as_precision(tiny_bundle, tmp_path / "b8", "fp8")
    calls = _fake_build_env(monkeypatch, cc="8.7")
    with pytest.raises(EngineMismatch, match=r"^fp8 engines \(E4M3 Q/DQ\) need a GPU of compute capability 8.9 or "
                                             r"newer \(Ada, Hopper\); GPU is 8.7"):
        build_engines(bundle, tmp_path / "eng", EngineOptions())
    assert calls == [] and not (tmp_path / "eng").exists()
    calls = _fake_build_env(monkeypatch, cc="9.0")
    build_engines(bundle, tmp_path / "eng", EngineOptions(graphs=["vision_encoder"]))
    assert calls[0]["typing"] == "strong"


def test_require_compute_capability():
    require_compute_capability("9.0", "8.9", "fp8 engines")
    require_compute_capability("10.0", "8.9", "fp8 engines")
    with pytest.raises(EngineMismatch, match="compute capability 8.9 or newer"):
        require_compute_capability("8.6", "8.9", "fp8 engines", "RTX 3090")


def test_fp8_script_checks_the_device_first(tiny_bundle, tmp_path, monkeypatch, capsys):
    bundle = as_precision(tiny_bundle, tmp_path / "b8", "fp8")
    text = write_trtexec_script(bundle, tmp_path / "eng", EngineOptions()).read_text().splitlines()
    check = next(i for i, line in enumerate(text) if "require-cc 8.9 fp8" in line)
    assert check < next(i for i, line in enumerate(text) if line.startswith("trtexec"))
    assert all("--stronglyTyped" in line and "--fp8" not in line for line in text if line.startswith("trtexec"))
    import bridge_export.runtime.gpu.cuda as cuda

    monkeypatch.setattr(cuda, "device_info", lambda i=0: ("Orin", "8.7"))
    assert trt_compat_main(["require-cc", "8.9", "fp8"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "compute capability 8.9" in err and "Orin is 8.7" in err
    monkeypatch.setattr(cuda, "device_info", lambda i=0: ("H100", "9.0"))
    assert trt_compat_main(["require-cc", "8.9", "fp8"]) == 0


def test_weak_trtexec_script_for_old_tensorrt_pins_layers(tiny_bundle, tmp_path):
    bundle = as_precision(tiny_bundle, tmp_path / "b16", "fp16", ["/a/norm"])
    text = write_trtexec_script(bundle, tmp_path / "eng", EngineOptions(), trt_major=8).read_text()
    line = next(line for line in text.splitlines() if "text_decoder.onnx" in line)
    assert "--fp16" in line and "--precisionConstraints=obey" in line and "--layerPrecisions=/a/norm:fp32" in line
    assert "--stronglyTyped" not in line


@pytest.mark.parametrize("major", [10, 11])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "fp8"])
def test_loader_flags_per_tensorrt_major_and_precision(major, precision, tmp_path):
    """What reaches Polygraphy: a strongly typed network and no precision flag, for every precision."""
    save = engine_loader(fake_trt(f"{major}.0.0"), "g.onnx", tmp_path / "g.engine", [{"x": ([1], [1], [1])}],
                         precision_plan(major, precision), EngineOptions())
    config = save._engine._config
    assert save._engine._network.strongly_typed
    assert (config.fp16, config.int8, config.fp8, config.tf32, config.bf16) == (False,) * 5


@pytest.mark.parametrize("precision,flag", [("fp16", "fp16"), ("int8", "int8"), ("fp8", "fp8")])
def test_loader_flags_of_the_weak_fallback(precision, flag, tmp_path):
    save = engine_loader(fake_trt(), "g.onnx", tmp_path / "g.engine", [{"x": ([1], [1], [1])}],
                         precision_plan(10, precision, ["n"], fallback="f"), EngineOptions())
    config = save._engine._config
    assert {f for f in ("fp16", "int8", "fp8") if getattr(config, f)} == {flag} and not config.tf32
