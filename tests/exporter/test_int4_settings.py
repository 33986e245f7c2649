"""int4-cpu settings: block sizes onnxruntime cannot run are refused up front; Int4Options.keep holds when streamed."""
import onnx
import pytest


def _cli(*args):
    from click.testing import CliRunner

    from bridge_export.exporter.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_block_size_above_256_is_refused_in_one_line(tmp_path):
    """onnxruntime's MatMulNBits runs block sizes 16-256 only: 512 is refused in one line before any
    weight is read (it used to pass the check and fail mid-stream with onnxruntime's traceback)."""
    r = _cli("onnx", "--preset", "tiny", "--precision", "int4-cpu", "--block-size", "512", "--out", tmp_path / "b")
    assert isinstance(r.exception, SystemExit), repr(r.exception)  # a ClickException, not a RuntimeError
    assert r.exit_code == 1 and "block size" in r.output
    assert not (tmp_path / "b").exists()


def test_streamed_export_honours_int4_keep(tmp_path):
    """Int4Options.keep (node-name parts left fp32) means the same streamed as in quantize_graph: with
    keep=() the pooling heads (clip_projector) are quantized too."""
    from bridge_export import reference_model
    from bridge_export.exporter.quantize.int4 import Int4Options
    from bridge_export.exporter.export.stream_export import export_model

    out = export_model(reference_model.from_preset("tiny", seed=0), tmp_path / "s", precision="int4-cpu",
                       int4=Int4Options(keep=()), progress=lambda s: None)
    m = onnx.load(str(out / "vision_encoder.onnx"), load_external_data=False)
    q4 = [t.name for t in m.graph.initializer if t.name.startswith("clip_projector") and t.name.endswith("_Q4")]
    assert q4, "keep=() should quantize the pooling head's MatMuls, as MatMulNBitsQuantizer does"
