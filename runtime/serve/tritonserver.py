"""Run the tritonserver that the PyTriton wheel bundles (Python backend only) on a model repository.

PyTriton ships `tritonserver` with one Python-backend stub per Python version; the stub links the
system's libpython, so the interpreter's own LIBDIR goes first on LD_LIBRARY_PATH. This is how the
CPU variant of a `triton-repo` repository (`--backend python`) runs without a Triton container.
"""
from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from bridge_export.runtime.errors import MissingDependency

from bridge_export.runtime.serve import SERVE_EXTRA


def _dist() -> Path:
    try:
        import pytriton
    except ImportError as e:
        raise MissingDependency(SERVE_EXTRA) from e
    return Path(pytriton.__file__).parent


def prepare(workdir) -> Path:
    """Copy the bundled tritonserver into `workdir` with this interpreter's Python-backend stub; its root."""
    dist = _dist() / "tritonserver"
    root = Path(workdir) / "tritonserver"
    if not root.is_dir():
        shutil.copytree(dist, root, ignore=shutil.ignore_patterns("python_backend_stubs"))
        stub = dist / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / \
            "triton_python_backend_stub"
        if not stub.is_file():
            raise MissingDependency(f"PyTriton has no Python-backend stub for Python {sys.version_info[0]}."
                               f"{sys.version_info[1]}: use Python 3.8-3.13")
        shutil.copy(stub, root / "backends" / "python" / "triton_python_backend_stub")
    return root


def environment() -> dict:
    """The environment tritonserver and its Python stubs need (this interpreter's libpython first)."""
    env = os.environ.copy()
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(_dist().parent / "nvidia_pytriton.libs")]
    env["LD_LIBRARY_PATH"] = ":".join([p for p in libs if p] + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def command(root: Path, repo, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002) -> list[str]:
    """The tritonserver command line for `repo`."""
    return [str(root / "bin" / "tritonserver"), f"--model-repository={Path(repo).absolute()}",
            f"--backend-directory={root / 'backends'}", f"--cache-directory={root / 'caches'}",
            f"--http-port={http_port}", f"--grpc-port={grpc_port}", f"--metrics-port={metrics_port}",
            "--exit-timeout-secs=10"]


def main(argv=None) -> int:
    """`python -m bridge_export.runtime.serve.tritonserver REPO [--http-port N ...]`: serve a repository, stop on SIGTERM."""
    import argparse
    import signal
    import subprocess
    import tempfile

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("repo")
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--metrics-port", type=int, default=8002)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bridge-export-tritonserver-") as work:
        root = prepare(work)
        proc = subprocess.Popen(command(root, args.repo, args.http_port, args.grpc_port, args.metrics_port),
                                env=environment())
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: proc.terminate())
        return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
