"""`triton-repo`: every config.pbtxt parses as Triton's ModelConfig and says what the bundle needs."""
from __future__ import annotations

import json
import os

import pytest

from bridge_export.runtime.serve.triton_repo import ENTRIES, MARKER, RepoError, RepoOptions, parse_config, write_repo

pytest.importorskip("tritonclient", reason="config validation needs tritonclient (in the [test] extra)")


def _configs(repo):
    return {d.name: parse_config((d / "config.pbtxt").read_text()) for d in repo.iterdir() if d.is_dir()}


def test_onnxruntime_repo(tiny_text_bundle, tmp_path):
    repo = write_repo(tiny_text_bundle, tmp_path / "repo", RepoOptions(ort_tensorrt=True, instances=2))
    cfg = _configs(repo)
    assert sorted(cfg) == sorted(("vision_encoder", "query_bridge") + ENTRIES)
    man = json.loads((tiny_text_bundle / "manifest.json").read_text())
    ve = cfg["vision_encoder"]
    assert ve.backend == "onnxruntime" and ve.max_batch_size == man["limits"]["max_batch"]
    assert ve.HasField("dynamic_batching") and ve.instance_group[0].count == 2
    assert [list(i.dims) for i in ve.input] == [[3, 32, 32]]
    acc = ve.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert acc.name == "tensorrt" and acc.parameters["trt_profile_max_shapes"] == "pixel_values:8x3x32x32"
    qb = cfg["query_bridge"]
    assert len(qb.output) == len(man["graphs"]["query_bridge"]["outputs"])
    # the graph and its external weights, hard-linked (no copy) where the filesystem allows
    model = repo / "vision_encoder" / "1" / "model.onnx"
    assert model.read_bytes() == (tiny_text_bundle / "vision_encoder.onnx").read_bytes()
    assert (model.parent / "weights.bin").stat().st_ino == (tiny_text_bundle / "weights.bin").stat().st_ino
    cap = cfg["caption"]
    assert cap.backend == "python" and cap.HasField("dynamic_batching")
    assert {i.name: i.optional for i in cap.input} == {"image": False, "prompt": True, "max_new_tokens": True,
                                                        "num_beams": True}
    assert json.loads(cap.parameters["bls_models"].string_value) == {"vision_encoder": "vision_encoder",
                                                                    "query_bridge": "query_bridge"}
    assert cfg["caption_stream"].model_transaction_policy.decoupled
    assert list(cfg["embed_image"].output[0].dims) == [24]
    assert (repo / "caption" / "1" / "bridge_export" / "runtime" / "serve" / "handlers.py").is_file()
    assert (repo / "caption" / "1" / "bundle" / "manifest.json").is_file()


def test_tensorrt_repo_needs_engines_and_uses_their_profiles(tiny_text_bundle, tmp_path):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_text_bundle, bundle)
    with pytest.raises(RepoError, match="bridge-export engine"):
        write_repo(bundle, tmp_path / "repo", RepoOptions(backend="tensorrt"))
    (bundle / "engines").mkdir()
    for g in ("vision_encoder", "query_bridge", "text_decoder"):  # stand-ins: the configs are under test here
        (bundle / "engines" / f"{g}.engine").write_bytes(b"plan " + g.encode())
    with pytest.raises(RepoError, match="exceeds the engines' largest profile batch 8"):
        write_repo(bundle, tmp_path / "repo", RepoOptions(backend="tensorrt", max_batch=16))
    repo = write_repo(bundle, tmp_path / "repo", RepoOptions(backend="tensorrt"))
    cfg = _configs(repo)
    ve = cfg["vision_encoder"]
    assert ve.backend == "tensorrt" and ve.max_batch_size == 8 and list(ve.instance_group[0].profile) == ["0"]
    assert (repo / "vision_encoder" / "1" / "model.plan").read_bytes() == b"plan vision_encoder"
    assert cfg["caption"].parameters["decoder_backend"].string_value == "tensorrt"
    assert (repo / "caption" / "1" / "bundle" / "engines" / "text_decoder.engine").is_file()


def test_python_cpu_variant_and_overwrite_rules(tiny_text_bundle, tmp_path):
    repo = write_repo(tiny_text_bundle, tmp_path / "repo", RepoOptions(backend="python", gpu=False),
                      entries=("embed_image",))
    cfg = _configs(repo)
    assert sorted(cfg) == ["embed_image", "query_bridge", "vision_encoder"]
    assert cfg["vision_encoder"].backend == "python"
    assert cfg["vision_encoder"].parameters["graph"].string_value == "vision_encoder"
    assert cfg["vision_encoder"].instance_group[0].kind == cfg["vision_encoder"].instance_group[0].KIND_CPU
    with pytest.raises(RepoError, match="--overwrite"):
        write_repo(tiny_text_bundle, repo)
    assert write_repo(tiny_text_bundle, repo, RepoOptions(backend="python"), overwrite=True) == repo
    assert json.loads((repo / MARKER).read_text())["backend"] == "python"
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("user data")
    with pytest.raises(RepoError, match="not written by triton-repo"):
        write_repo(tiny_text_bundle, other, overwrite=True)
    assert (other / "keep.txt").read_text() == "user data"
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_parse_config_rejects_what_triton_would(tmp_path):
    with pytest.raises(RepoError, match="ModelConfig"):
        parse_config('name: "x"\nmax_batch_size: 4\ndynamic_batching { max_queue_delay: 3 }\n')
    assert parse_config('name: "x"\nbackend: "python"\n').backend == "python"


def test_cli_triton_repo(tiny_text_bundle, tmp_path):
    from click.testing import CliRunner

    from bridge_export.exporter.cli import main

    r = CliRunner().invoke(main, ["triton-repo", str(tiny_text_bundle), "--out", str(tmp_path / "r"), "--cpu",
                                  "--backend", "python"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r" / "caption" / "config.pbtxt").is_file()
    r = CliRunner().invoke(main, ["triton-repo", str(tiny_text_bundle), "--out", str(tmp_path / "t"),
                                  "--backend", "tensorrt"])
    assert r.exit_code != 0 and "bridge-export engine" in r.output
    assert os.listdir(tmp_path) == ["r"]


def test_serve_without_pytriton_names_the_extra(tiny_text_bundle):
    import importlib.util

    from click.testing import CliRunner

    from bridge_export.exporter.cli import main

    if importlib.util.find_spec("pytriton") is not None:
        pytest.skip("PyTriton is installed here: the end-to-end tests cover serve")
    r = CliRunner().invoke(main, ["serve", str(tiny_text_bundle)])
    assert r.exit_code != 0 and 'pip install "bridge-export[serve]"' in r.output
    assert "Traceback" not in r.output
