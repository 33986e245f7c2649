"""The Jetson path: a trtexec build script from a bundle, then the TensorRT runtime call.

Exports the shipped digits model into a temporary directory and runs
`bridge-export engine BUNDLE --emit-trtexec`, which writes `engines/build_engines.sh`: one
trtexec command per graph with the bundle's optimisation profiles and precision flags. Copy the
bundle to the device and run that script there (trtexec ships with JetPack).

The runtime then opens engines with `runtime.load(bundle, backend="tensorrt")`. It checks each
engine's sidecar (TensorRT version, GPU, profiles) before loading it: `bridge-export engine BUNDLE`
(TensorRT's Python builder) writes it, and so does the script, which stamps a sidecar template
after each trtexec build (`python3 -m bridge_export.runtime.gpu.trt_compat stamp`, needing TensorRT's Python package,
which JetPack ships). For JetPack 7 (TensorRT 11) add `--trt-major 11`.
Where TensorRT or a GPU is missing (as on a plain CPU machine) this part says so and stops cleanly.

    python examples/05_jetson_tensorrt.py
"""
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bridge_export import runtime
from bridge_export.exporter.export.bundle import export_bundle
from bridge_export.reference_model import DEMO_CHECKPOINT, load_pretrained
from bridge_export.reference_model.digits import WORDS, load_test_split


def bridge_export(*args: str) -> str:
    """Run the bridge-export CLI (the installed command, or the module where it is not on PATH)."""
    exe = shutil.which("bridge-export")
    cmd = [exe] if exe else [sys.executable, "-m", "bridge_export.exporter.cli"]
    done = subprocess.run(cmd + list(args), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bridge-export {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def tensorrt_ready() -> str:
    """'' when TensorRT and a GPU are usable here, else the reason they are not."""
    try:
        import tensorrt as trt
    except ImportError:
        return ("TensorRT is not installed here (JetPack includes it on a Jetson; on an x86 GPU machine "
                "install NVIDIA's TensorRT wheels)")
    try:
        trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as e:  # no driver / no GPU: "CUDA initialization failure"
        return f"TensorRT {trt.__version__} is installed but cannot reach a GPU ({e})"
    return ""


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        bundle = export_bundle(load_pretrained(DEMO_CHECKPOINT), Path(tmp) / "bundle", checkpoint=DEMO_CHECKPOINT)

        print("\n1. on any machine: the trtexec script for the device")
        print(bridge_export("engine", str(bundle), "--emit-trtexec").strip())
        script = bundle / "engines" / "build_engines.sh"
        print(f"--- {script.name} ---")
        print(script.read_text())

        print("2. on the device: engines and the TensorRT runtime call")
        print(f"   bridge-export engine {bundle.name}            # builds engines/*.engine + sidecars")
        print(f"   pipe = runtime.load('{bundle.name}', backend='tensorrt')")
        print("   pipe.classify(['digit.png'], WORDS, template='the digit {}')")
        why_not = tensorrt_ready()
        if why_not:
            print(f"\nskipped the TensorRT run: {why_not}.")
            return
        print(bridge_export("engine", str(bundle)).strip())
        images, labels = load_test_split(DEMO_CHECKPOINT)
        pipe = runtime.load(bundle, backend="tensorrt")
        probs = pipe.classify(list(images[:32]), WORDS, template="the digit {}")
        right = sum(best == WORDS[t] for best, t in zip(probs.best_labels, labels[:32]))
        print(f"TensorRT zero-shot accuracy on 32 test digits: {right / 32:.0%}")
        pipe.close()


if __name__ == "__main__":
    main()
