"""Reading a bundle's manifest: the only contract between exporter and runtime."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

FORMAT = "bridge-export-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(UserError, ValueError):
    """A bundle that is missing, corrupt or from an incompatible exporter: the message says what to do."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Manifest:
    """A parsed, checked manifest and the directory it lives in."""

    root: Path
    data: dict

    def __getitem__(self, key):
        return self.data[key]

    def get(self, key, default=None):
        """A top-level manifest field, or `default`."""
        return self.data.get(key, default)

    def path(self, rel: str) -> Path:
        """Absolute path of a file inside the bundle."""
        return self.root / rel

    def graph_path(self, name: str) -> Path:
        """Path of the named graph; BundleError if the bundle has none."""
        if name not in self.data["graphs"]:
            raise BundleError(f"bundle {self.root} has no graph {name!r} (has {sorted(self.data['graphs'])})")
        return self.root / self.data["graphs"][name]["file"]

    def host_tensor(self, name: str) -> np.ndarray:
        """A small host-side tensor (e.g. text_projection) as numpy."""
        return np.load(self.root / self.data["host_tensors"][name], allow_pickle=False)

    @property
    def model(self) -> dict:
        """The model config in the original config.json layout."""
        return self.data["model"]


DIGEST = "manifest_sha256"
# fields the runtime reads: a manifest without one is refused with its name, not a KeyError later
REQUIRED = ("format_version", "precision", "model", "model.num_query_token", "model.qllama_config", "graphs", "special_tokens",
            "special_tokens.bos", "special_tokens.eos", "special_tokens.pad", "prompts", "prompts.text_embedding",
            "preprocessing", "preprocessing.image_size", "preprocessing.mean", "preprocessing.std", "host_tensors",
            "files")


def manifest_digest(data: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own digest field (detects hand edits)."""
    body = {k: v for k, v in data.items() if k != DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_fields(data: dict, mpath: Path) -> None:
    for dotted in REQUIRED:
        node = data
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise BundleError(f"{mpath} lacks the field {dotted!r}: it was edited or written by another tool; "
                                  "re-export the bundle")
            node = node[part]


def read_manifest(bundle, verify_checksums: bool = True) -> Manifest:
    """Open `bundle/manifest.json`, check format, version, files and (optionally) every sha256."""
    root = Path(bundle)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root} is not a directory: give the bundle directory `bridge-export onnx` wrote")
    if not mpath.is_file():
        raise BundleError(f"{root} has no {MANIFEST}: not a bundle, or an export that did not finish; re-export it")
    try:
        data = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{mpath} is not valid JSON ({e}): re-export the bundle") from e
    if data.get("format") != FORMAT:
        raise BundleError(f"{mpath} is not a {FORMAT} manifest")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(
            f"{root} was written in bundle format {version}, newer than this runtime reads ({FORMAT_VERSION}): "
            "upgrade bridge-export"
        )
    _check_fields(data, mpath)
    if DIGEST in data and data[DIGEST] != manifest_digest(data):
        raise BundleError(f"{mpath} was edited after export (its digest no longer matches): edits such as mean/std or "
                          "special tokens silently change results; restore it or re-export the bundle")
    missing = [f for f in data.get("files", {}) if not (root / f).is_file()]
    if missing:
        raise BundleError(f"{root} is incomplete: missing {missing}; copy the whole bundle or re-export it")
    if verify_checksums:
        for rel, digest in data["files"].items():
            got = sha256_file(root / rel)
            if got != digest:
                raise BundleError(
                    f"{root / rel} is corrupt: sha256 {got[:12]}... differs from the manifest's {digest[:12]}...; "
                    "re-copy or re-export the bundle"
                )
    return Manifest(root, data)
