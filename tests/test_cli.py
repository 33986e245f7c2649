"""The CLI is a thin layer: each command runs and bad input gets a one-line error."""
import numpy as np
from click.testing import CliRunner
from PIL import Image

from bridge_export.exporter.cli import main


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_onnx_inspect_verify(tmp_path):
    out = tmp_path / "b"
    r = _run("onnx", "--preset", "tiny", "--out", out, "--max-batch", "4")
    assert r.exit_code == 0, r.output
    r = _run("inspect", out)
    assert r.exit_code == 0 and "past_key_values.{i}.key" in r.output and "visual prefix 6 slots" in r.output
    r = _run("verify", out, "--preset", "tiny")
    assert r.exit_code == 0 and "PASSED" in r.output
    r = _run("verify", out, "--preset", "tiny", "--seed", "3")
    assert r.exit_code == 1 and "FAILED" in r.output
    r = _run("onnx", "--preset", "tiny", "--out", out)
    assert r.exit_code == 1 and "already exists: choose another --out or pass --overwrite" in r.output
    assert "Traceback" not in r.output


def test_user_commands_on_demo_bundle(tmp_path):
    from bridge_export import reference_model
    from bridge_export.reference_model.digits import load_test_split

    ckpt = reference_model.DEMO_CHECKPOINT
    out = tmp_path / "demo"
    assert _run("onnx", "--checkpoint", ckpt, "--out", out).exit_code == 0
    images, _ = load_test_split(ckpt)
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        Image.fromarray(images[i]).save(d / f"{i}.png")
    r = _run("classify", out, d, "--labels", "zero,one,two,three,four,five,six,seven,eight,nine",
             "--template", "the digit {}")
    assert r.exit_code == 0 and len(r.output.strip().splitlines()) == 3
    r = _run("caption", out, d / "0.png", "--min-new-tokens", "0", "--max-new-tokens", "6")
    assert r.exit_code == 0 and "the digit" in r.output
    r = _run("caption", out, d)  # the CLI defaults: the bundle's min_new_tokens (0 for this model), not 8
    captions = [line.split("\t")[1] for line in r.output.splitlines() if "\t" in line]
    assert r.exit_code == 0 and len(captions) == 3
    # The retrained demo model (augmented, generalises to unseen styles) does not reliably end with EOS
    # under 5 beams, so a caption may run on up to the bundle's max_new_tokens (8); it must still
    # start with "the digit <name>" (a known regression, said in the README's known limits).
    from bridge_export.reference_model.digits import WORDS

    assert all(c.split()[:2] == ["the", "digit"] and c.split()[2] in WORDS for c in captions), captions
    r = _run("caption", out, d / "0.png", "--stream", "--min-new-tokens", "0", "--max-new-tokens", "6")
    assert r.exit_code == 0 and "the digit" in r.output
    r = _run("embed", out, d, "--texts", "the digit one", "--out", tmp_path / "e.npz")
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "e.npz")["embeddings"].shape == (4, 32)
    r = _run("embed", out, tmp_path / "missing.png")
    assert r.exit_code == 1 and "cannot read image" in r.output


def test_bench_prints_ratios(tiny_bundle):
    r = _run("bench", tiny_bundle, "--preset", "tiny", "--pasts", "8,32", "--tokens", "4")
    assert r.exit_code == 0, r.output
    assert "decode_tok_s@32" in r.output and "x (target <= 1.5x)" in r.output and "ratio" in r.output


def test_engine_emit_trtexec(tiny_bundle, tmp_path):
    r = _run("engine", tiny_bundle, "--emit-trtexec", "--out", tmp_path / "e")
    assert r.exit_code == 0 and (tmp_path / "e" / "build_engines.sh").is_file()


def test_precision_at_export_time(tmp_path, tiny_bundle):
    out = tmp_path / "b"
    r = _run("onnx", "--preset", "tiny", "--out", out, "--precision", "fp16")
    assert r.exit_code == 0, r.output
    from bridge_export.runtime.manifest import read_manifest

    assert read_manifest(out).precision.mode == "fp16"  # written directly, no fp32 bundle first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    r = _run("precision", tiny_bundle, "--precision", "int8", "--out", tmp_path / "q")
    assert r.exit_code == 1 and "int8 needs --calib" in r.output


def test_missing_extra_is_one_line(tmp_path):
    """Without torch, an export command names the extra to install; bundle commands still start."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, Block())
        from bridge_export.exporter.cli import main
        main(sys.argv[1:])
    """)
    r = subprocess.run([sys.executable, "-c", code, "onnx", "--preset", "tiny", "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == \
        'Error: this command needs torch, which is not installed: pip install "bridge-export[export]"'
    assert not (tmp_path / "x").exists()
    r = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "caption" in r.stdout


def test_bench_load_prints_side_by_side(tiny_bundle):
    r = _run("bench-load", tiny_bundle, "--repeats", "1")
    assert r.exit_code == 0, r.output
    rows = {line.split("  ")[0].strip(): line for line in r.output.splitlines()}
    assert {"onnxruntime", "runtime.load", "runtime.load(verify_checksums=True)"} <= set(rows)
    assert rows["onnxruntime"].rstrip().endswith("1.00x") and "ratio = time / onnxruntime" in r.output


def test_verify_checksums_only(tiny_bundle, tmp_path):
    import shutil

    b = shutil.copytree(tiny_bundle, tmp_path / "b")
    r = _run("verify", b, "--checksums")
    assert r.exit_code == 0 and "files match the manifest" in r.output, r.output
    data = bytearray((b / "weights.bin").read_bytes())
    data[100] ^= 1
    (b / "weights.bin").write_bytes(bytes(data))
    r = _run("inspect", b)  # the default sampled digest covers every byte of a file this small
    assert r.exit_code == 1 and "weights.bin is damaged" in r.output and "verify --checksums" in r.output
    r = _run("verify", b, "--checksums")
    assert r.exit_code == 1 and "weights.bin is corrupt: sha256" in r.output


def test_device_options_fail_in_one_line_without_a_gpu(tiny_bundle, tmp_path):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    r = _run("caption", tiny_bundle, img, "--device", "cuda:0")
    if r.exit_code == 0:  # a GPU machine with onnxruntime-gpu and cuda-python: it simply ran there
        return
    assert r.exit_code == 1 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert "device='cpu'" in r.output or "pip install" in r.output
    r = _run("classify", tiny_bundle, img, "--labels", "a,b", "--backend", "tensorrt", "--device", "cpu")
    assert r.exit_code == 1 and "TensorRT runs on a GPU" in r.output
    r = _run("classify", tiny_bundle, img, "--labels", "a,b", "--device", "tpu")
    assert r.exit_code == 1 and "'cpu', 'cuda' or 'cuda:N'" in r.output
