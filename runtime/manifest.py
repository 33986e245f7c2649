"""The bundle's manifest: typed dataclasses read and written as JSON, the one exporter/runtime contract.

Every field the runtime needs is an attribute here (`manifest.kv_layout.past(i)`,
`manifest.prompts.caption.num_beams`, `manifest.graphs["text_decoder"].tensorrt_profiles`);
nothing downstream indexes nested dicts. `model` keeps the original `config.json` layout (so the
reference can be rebuilt from a bundle); `dims` is the typed summary of it the runtime reads.

Compatibility policy
--------------------
* `format_version` is bumped whenever a reader of the previous version would misread a bundle.
  A bundle of an older version is refused with one line naming its format/version and saying to
  re-export; one of a newer version is refused with a line saying to upgrade bridge-export.
* Within one version, readers ignore JSON keys they do not know, at every level. They are kept
  (each record's `extra`) and written back unchanged, so a tool that rewrites the manifest (for
  example a precision conversion) never drops what a newer exporter or another tool added.
  New optional fields therefore need no version bump; new required ones do.
* `manifest_sha256` is the sha256 of the manifest's canonical JSON without that field: an edited
  manifest is detected on every load, cheaply. File contents are checked by size, ONNX header and
  a sampled digest (`FileEntry.sample`: SAMPLE_BLOCKS fixed blocks) on load, by full sha256 only
  on request (`verify_checksums=True`).
* Every file a manifest names (and every external-data file a graph names) must lie inside the
  bundle directory: absolute paths, `..` and symbolic links leading out are refused on read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from bridge_export.runtime.errors import UserError

FORMAT = "bridge-export-bundle"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
# The bundle's graphs, in run order: the one list every module uses.
GRAPHS = ("vision_encoder", "query_bridge", "text_decoder")

log = logging.getLogger(__name__)


class BundleError(UserError, ValueError):
    """A bundle that is missing, corrupt or from an incompatible exporter: the message says what to do."""


SAMPLE_BLOCKS = 64  # blocks hashed by the load-time sample digest, spread evenly over the file
SAMPLE_BLOCK = 1 << 16  # bytes per block: 4 MiB read per file at most, whatever its size


def sample_sha256(path: Path) -> str:
    """sha256 of SAMPLE_BLOCKS fixed blocks of a file (first, last, evenly between) and its size.

    Cheap enough for every load (at most 4 MiB read per file), and it catches what a size check
    cannot: a copy of the right size whose contents never arrived (a preallocated, zero-filled
    file), a damaged stretch of the file, another file of the same size. Damage between the
    sampled blocks is left to the output finiteness checks and to `verify --checksums`.
    """
    h = hashlib.sha256()
    size = os.path.getsize(path)
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= SAMPLE_BLOCKS * SAMPLE_BLOCK:
            while block := f.read(1 << 22):
                h.update(block)
            return h.hexdigest()
        step = (size - SAMPLE_BLOCK) / (SAMPLE_BLOCKS - 1)
        for i in range(SAMPLE_BLOCKS):
            f.seek(int(i * step))
            h.update(f.read(SAMPLE_BLOCK))
    return h.hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 22, progress=None) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (`progress(n_bytes)` called per chunk if given)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if progress:
                progress(len(block))
    return h.hexdigest()


# -- generic JSON <-> dataclass conversion -----------------------------------------------------------
class _Mismatch(BundleError):
    """A JSON value that does not fit its field (raised as BundleError with the field's path)."""


def _convert(tp, value, where: str):
    """`value` (parsed JSON) as type `tp`; raises _Mismatch naming `where` when it does not fit."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except _Mismatch:
                pass
        raise _Mismatch(f"{where} must be {tp}, got {value!r:.60}")
    if isinstance(tp, type) and issubclass(tp, Record):
        return tp.from_dict(value, where)
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch(f"{where} must be a list, got {type(value).__name__}")
        (arg,) = typing.get_args(tp)
        return [_convert(arg, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch(f"{where} must be an object, got {type(value).__name__}")
        _, arg = typing.get_args(tp)
        return {k: _convert(arg, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise _Mismatch(f"{where} must be int, got bool")
    if tp in (int, str, bool, dict, list) and isinstance(value, tp):
        return value
    raise _Mismatch(f"{where} must be {getattr(tp, '__name__', tp)}, got {value!r:.60}")


def _plain(value):
    """A record tree as plain JSON values."""
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass
class Record:
    """Base of every manifest record: `from_dict` / `to_dict`, unknown keys kept in `extra`."""

    extra: dict = field(default_factory=dict, kw_only=True, repr=False, compare=False)

    @classmethod
    def _json_fields(cls):
        return [f for f in fields(cls) if f.name != "extra" and f.metadata.get("json", True)]

    @classmethod
    def from_dict(cls, d: dict, where: str | None = None):
        """Build from parsed JSON; raises BundleError naming the first field that is missing or mistyped."""
        where = where or cls.__name__
        if not isinstance(d, dict):
            raise _Mismatch(f"{where} must be an object, got {type(d).__name__}")
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in cls._json_fields()}
        kwargs, extra = {}, {}
        for k, v in d.items():
            if k in known:
                kwargs[k] = _convert(hints[k], v, f"{where}.{k}")
            else:
                extra[k] = v
        missing = [n for n, f in known.items() if n not in d and f.default is MISSING
                   and f.default_factory is MISSING]
        if missing:
            raise _Mismatch(f"{where} lacks {missing}")
        obj = cls(**kwargs)
        obj.extra = extra
        return obj

    def to_dict(self) -> dict:
        """Plain JSON values: known fields in declaration order, then the unknown ones kept on read."""
        out = {f.name: _plain(getattr(self, f.name)) for f in self._json_fields()}
        for k, v in self.extra.items():
            out.setdefault(k, v)
        return out


# -- the records ----------------------------------------------------------------------------------------
@dataclass
class TensorInfo(Record):
    """One graph input or output: name, dtype and shape (a str is a symbolic dim)."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass
class GraphInfo(Record):
    """One ONNX graph of the bundle."""

    file: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    precision: str = "fp32"
    tolerance: dict[str, float] = field(default_factory=dict)
    # [{input: [min, opt, max]}]: the shapes TensorRT engines are built for (`bridge-export engine`)
    tensorrt_profiles: list[dict[str, list[list[int]]]] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)  # what bridge_export.exporter.export.checks found (ops, opset)
    how: dict[str, Any] | None = None  # how a reduced-precision graph was made (free-form)
    report: dict[str, Any] | None = None  # its accuracy against fp32 (free-form)
    # bytes of external weights (weights.bin) the graph references; 0 = not recorded (older bundles).
    # The bridge and the decoder both count QLLaMA's: what onnxruntime's prepacking copies per session.
    weight_bytes: int = 0
    # operator target: "tensorrt" = portable ONNX (standard operators; onnxruntime runs it too),
    # "onnxruntime" = onnxruntime-only operators (com.microsoft contrib ops, integer MatMuls); "" in
    # bundles written before the field existed: read it through `operator_target`
    target: str = ""

    @property
    def operator_target(self) -> str:
        """The graph's operator target; older bundles: onnxruntime for the CPU precisions, else tensorrt."""
        if self.target:
            return self.target
        return "onnxruntime" if self.precision in ("int8-cpu", "int4-cpu") else "tensorrt"

    @property
    def fused(self) -> bool:
        """A decoder with onnxruntime's GroupQueryAttention over one shared KV buffer (exporter.export.fused_decoder)."""
        return any(t.name == "seqlens_k" for t in self.inputs)

    def tensor(self, name: str) -> TensorInfo:
        """The input or output called `name`."""
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.file} has no tensor {name!r}")


@dataclass
class ModelDims(Record):
    """The model's sizes the runtime needs (a typed summary of `Manifest.model`)."""

    image_size: int
    num_image_tokens: int  # patches + CLS
    vision_hidden_size: int
    embed_dim: int  # clip_embed_dim: the C/G and text embedding width
    text_hidden_size: int
    vocab_size: int
    num_query_token: int
    max_positions: int  # max_position_embeddings of QLLaMA (queries + text)


@dataclass
class KVLayout(Record):
    """The decoder's KV cache: sizes, and the name templates of every per-layer K/V tensor."""

    num_layers: int
    num_heads: int
    head_dim: int
    prefix_length: int  # visual prefix slots (the query tokens) written by `prefix_graph`
    max_positions: int
    past_key: str = "past_key_values.{i}.key"
    past_value: str = "past_key_values.{i}.value"
    present_key: str = "present.{i}.key"
    present_value: str = "present.{i}.value"
    prefix_key: str = "prefix.{i}.key"
    prefix_value: str = "prefix.{i}.value"
    prefix_graph: str = "query_bridge"
    axes: list[str] = field(default_factory=lambda: ["batch", "heads", "positions", "head_dim"])
    present_holds: str = "the K/V of this step's new positions only; the runtime writes them into its cache"
    key_rope: str = "keys are stored after RoPE"

    @property
    def text_start_position(self) -> int:
        """Position of the first text token (after the visual prefix)."""
        return self.prefix_length

    def past(self, i: int) -> tuple[str, str]:
        """(key, value) input names of layer i's past."""
        return self.past_key.format(i=i), self.past_value.format(i=i)

    def present(self, i: int) -> tuple[str, str]:
        """(key, value) output names of layer i's new K/V."""
        return self.present_key.format(i=i), self.present_value.format(i=i)

    def prefix(self, i: int) -> tuple[str, str]:
        """(key, value) output names of layer i's visual prefix."""
        return self.prefix_key.format(i=i), self.prefix_value.format(i=i)

    def names(self, kind: str) -> list[str]:
        """Every layer's names of `kind` ("past", "present" or "prefix"), flat: [k0, v0, k1, v1, ...]."""
        if kind not in ("past", "present", "prefix"):
            raise ValueError(f"kind must be past, present or prefix, got {kind!r}")
        return [n for i in range(self.num_layers) for n in getattr(self, kind)(i)]

    def layers(self) -> list[tuple[str, str, str, str]]:
        """Per layer: (past key, past value, present key, present value)."""
        return [self.past(i) + self.present(i) for i in range(self.num_layers)]


@dataclass
class SpecialTokens(Record):
    """Special token ids."""

    bos: int
    eos: int
    pad: int
    unk: int = 0


@dataclass
class TextEmbeddingPrompt(Record):
    """How texts are tokenized for embedding (the original's convention)."""

    prefix: str = "summarize:"
    add_bos: bool = True
    add_eos: bool = True
    padding: str = "right"
    max_length: int | None = 80
    truncation: str = "first tokens kept, then BOS and EOS added"
    pad_id: int = 0
    mask: str = "ids > 0"
    pool: str = "last non-pad token"


@dataclass
class CaptionPrompt(Record):
    """The caption prompt and generation defaults (the original's)."""

    prompt: str = "English caption:"
    add_bos: bool = True
    add_eos: bool = False
    num_beams: int = 5
    max_new_tokens: int = 30
    min_new_tokens: int = 8


@dataclass
class Prompts(Record):
    """Text conventions: embedding and caption."""

    text_embedding: TextEmbeddingPrompt = field(default_factory=TextEmbeddingPrompt)
    caption: CaptionPrompt = field(default_factory=CaptionPrompt)


@dataclass
class TextConventions:
    """What the text codec needs from a manifest (a Manifest itself has both attributes)."""

    special_tokens: SpecialTokens
    prompts: Prompts = field(default_factory=Prompts)


@dataclass
class Preprocessing(Record):
    """Image preprocessing (torchvision's transforms of the original, done in PIL + numpy)."""

    image_size: int
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    resize: str = "bicubic"
    retrieval: str = "resize to (size, size)"
    classification: str = "resize shorter side to size, center crop"
    channels: str = "RGB"


@dataclass
class ExactBPEInfo(Record):
    """Merge scores an older layout kept beside tokenizer.json (read only to ask for a re-export)."""

    scores: str
    whitespace_only_pieces: bool = True


@dataclass
class TokenizerInfo(Record):
    """The bundle's tokenizer.json and, for a SentencePiece tokenizer, the original model that encodes."""

    file: str
    exact_bpe: ExactBPEInfo | None = None  # older bundles only
    sentencepiece: str | None = None  # tokenizer.model: encoding exactly as the original (runtime.text)


@dataclass
class Limits(Record):
    """The largest batch and sequence the exported TensorRT profiles admit."""

    max_batch: int = 8
    max_seq: int = 0  # 0: max_position_embeddings

    def seq(self, max_positions: int) -> int:
        """The longest sequence (queries + text) the profiles must admit."""
        return min(self.max_seq or max_positions, max_positions)


@dataclass
class PrecisionInfo(Record):
    """The bundle's precision, where it came from and what is known of its accuracy.

    `report` is free-form: tools that convert or check precision record there what they kept in
    higher precision, the cosines they measured, and so on.
    """

    mode: str = "fp32"  # fp32 | fp16 | int8 | int8-cpu | int4-cpu
    derived_from: dict[str, Any] | None = None
    accuracy: dict[str, Any] | None = None
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class FileEntry(Record):
    """One file of the bundle: its size and sampled digest (checked on every load) and sha256 (on request)."""

    size: int
    sha256: str
    sample: str = ""  # sample_sha256 of the file; "" in bundles written before it existed (not checked)


@dataclass(kw_only=True)
class Manifest(Record):
    """A bundle's manifest. Read with `read_manifest(bundle)`; `root` is the directory it lives in."""

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    source: str = ""
    model: dict[str, Any] = field(default_factory=dict)  # the original config.json layout
    dims: ModelDims
    graphs: dict[str, GraphInfo]
    weights: str = "weights.bin"
    kv_layout: KVLayout
    special_tokens: SpecialTokens
    prompts: Prompts = field(default_factory=Prompts)
    preprocessing: Preprocessing
    tokenizer: TokenizerInfo | None = None
    host_tensors: dict[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    precision: PrecisionInfo = field(default_factory=PrecisionInfo)
    versions: dict[str, Any] = field(default_factory=dict)
    files: dict[str, FileEntry] = field(default_factory=dict)
    manifest_sha256: str = ""
    root: Path | None = field(default=None, metadata={"json": False}, compare=False)

    def path(self, rel: str) -> Path:
        """Absolute path of a file inside the bundle; BundleError if `rel` leads out of it."""
        return confined(Path(self.root), rel)

    def graph(self, name: str) -> GraphInfo:
        """The named graph's entry; BundleError if the bundle has none."""
        if name not in self.graphs:
            raise BundleError(f"bundle {self.root} has no graph {name!r} (has {sorted(self.graphs)})")
        return self.graphs[name]

    def graph_path(self, name: str) -> Path:
        """Path of the named graph; BundleError if the bundle has none."""
        return self.path(self.graph(name).file)

    def host_tensor(self, name: str) -> np.ndarray:
        """A small host-side tensor (e.g. text_projection) as numpy."""
        if name not in self.host_tensors:
            raise BundleError(f"bundle {self.root} has no host tensor {name!r}: re-export it")
        return np.load(self.path(self.host_tensors[name]), allow_pickle=False)

    def digest(self) -> str:
        """sha256 of this manifest's canonical JSON, without `manifest_sha256` itself."""
        return manifest_digest(self.to_dict())

    def to_json(self) -> str:
        """The manifest as JSON text, `manifest_sha256` set to the current digest."""
        d = self.to_dict()
        d["manifest_sha256"] = manifest_digest(d)
        return json.dumps(d, indent=2)

    def save(self, directory) -> Path:
        """Write `directory/manifest.json` (temporary sibling, then rename) and set `root`."""
        directory = Path(directory)
        self.manifest_sha256 = self.digest()
        path = directory / MANIFEST
        tmp = directory / f".{MANIFEST}.partial-{os.getpid()}"
        tmp.write_text(self.to_json())
        tmp.replace(path)
        self.root = directory
        return path

    def verify_checksums(self, progress: bool = False) -> None:
        """Hash every file and compare with the manifest; BundleError naming the first that differs."""
        total = sum(e.size for e in self.files.values())
        bar = None
        if progress:
            from bridge_export.runtime.progress import progress as progress_bar

            bar = progress_bar(total=total, unit="B", unit_scale=True, desc="sha256")
        try:
            for rel, entry in self.files.items():
                got = sha256_file(self.path(rel), progress=bar.update if bar else None)
                if got != entry.sha256:
                    raise BundleError(f"{self.path(rel)} is corrupt: sha256 {got[:12]}... differs from the "
                                      f"manifest's {entry.sha256[:12]}...; re-copy or re-export the bundle")
        finally:
            if bar:
                bar.close()


def confined(root: Path, rel, what: str = "file") -> Path:
    """`root / rel`, refused with BundleError when it lies outside `root` once resolved: an absolute
    path, `..`, or a symbolic link (of the file or of a folder on the way) that leads out."""
    root = Path(root)
    rel_text = str(rel)
    path = root / rel_text
    if not rel_text or Path(rel_text).is_absolute() or ".." in Path(rel_text).parts:
        inside = False
    else:
        try:
            inside = path.resolve().is_relative_to(root.resolve())
        except (OSError, RuntimeError):  # a symbolic link loop
            inside = False
    if not inside:
        raise BundleError(f"bundle {root}: its manifest names {what} {rel_text!r}, which lies outside the bundle "
                          "(an absolute path, '..' or a symbolic link leading out): refusing to read it; a bundle "
                          "names only files inside its own directory")
    return path


def named_files(man: "Manifest") -> list[tuple[str, str]]:
    """(what, relative path) of every file the manifest names: listed files, graphs, weights, tokenizer, tensors."""
    out = [("file", rel) for rel in man.files]
    out += [(f"graph {name}", g.file) for name, g in man.graphs.items()]
    out += [("weights", man.weights)] if man.weights else []
    if man.tokenizer is not None:
        out.append(("tokenizer", man.tokenizer.file))
        if man.tokenizer.exact_bpe is not None:
            out.append(("tokenizer scores", man.tokenizer.exact_bpe.scores))
        if man.tokenizer.sentencepiece is not None:
            out.append(("tokenizer model", man.tokenizer.sentencepiece))
    out += [(f"host tensor {k}", v) for k, v in man.host_tensors.items()]
    return out


def _check_external_data(root: Path, graph_rel: str) -> None:
    """Every external-data location the graph names lies inside the bundle (read from the graph file alone)."""
    from bridge_export.runtime.onnx_refs import ProtoError, external_locations

    graph = root / graph_rel
    try:
        locations = external_locations(graph)
    except ProtoError as e:
        raise BundleError(f"{graph} is not a well-formed ONNX model ({e}): the file is damaged or replaced; "
                          "re-copy or re-export the bundle") from None
    for loc in sorted(locations):
        rel = loc if Path(loc).is_absolute() else str(Path(graph_rel).parent / loc)
        confined(root, rel, f"(in {Path(graph_rel).name}'s external data) file")


def manifest_digest(d: dict) -> str:
    """sha256 of a manifest dict's canonical JSON (sorted keys, no spaces), `manifest_sha256` left out."""
    body = {k: v for k, v in d.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ONNX files are serialized ModelProtos, whose first field is ir_version (field 1, varint: tag 0x08).
_ONNX_TAG = 0x08


def _check_onnx_header(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(2)
    if len(head) < 2 or head[0] != _ONNX_TAG or not 1 <= head[1] < 64:
        raise BundleError(f"{path} is not an ONNX model (bad header): the file is damaged or replaced; "
                          "re-copy or re-export the bundle")


def parse_manifest(data: dict, root=None) -> Manifest:
    """A Manifest from parsed manifest.json content (format, version and fields checked)."""
    where = Path(root) / MANIFEST if root else MANIFEST
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"{where} is not a {FORMAT} manifest")
    version = data.get("format_version")
    if not isinstance(version, int):
        raise BundleError(f"{where} has no integer format_version: re-export the bundle")
    if version > FORMAT_VERSION:
        raise BundleError(f"{root} was written in bundle format {version}, newer than this runtime reads "
                          f"({FORMAT_VERSION}): upgrade bridge-export")
    if version < FORMAT_VERSION:
        raise BundleError(f"{root} is a {FORMAT} v{version} bundle; this bridge-export reads v{FORMAT_VERSION} "
                          "only: re-export it with `bridge-export onnx`")
    try:
        man = Manifest.from_dict(data, "manifest")
    except _Mismatch as e:
        raise BundleError(f"{where}: {e}: re-export the bundle") from None
    man.root = Path(root) if root else None
    return man


def read_manifest(bundle, verify_checksums: bool = False) -> Manifest:
    """Open `bundle/manifest.json` and check what is cheap; with verify_checksums, every file's sha256 too.

    Always checked: format and version, the manifest's own digest (an edited manifest is refused),
    every named file inside the bundle (graphs' external data included), every listed file present
    with its recorded size and sampled digest, and each graph's ONNX header.
    """
    root = Path(bundle)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root} is not a directory: give the bundle directory `bridge-export onnx` wrote")
    if not mpath.is_file():
        raise BundleError(f"{root} has no {MANIFEST}: not a bundle, or an export that did not finish; re-export it")
    try:
        data = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath} is not valid JSON ({e}): re-export the bundle") from e
    man = parse_manifest(data, root)
    if data.get("manifest_sha256") != manifest_digest(data):
        raise BundleError(f"{mpath} was edited after export (its digest does not match its content): "
                          "restore it or re-export the bundle")
    for what, rel in named_files(man):
        path = confined(root, rel, what)
        if path.exists() and not path.is_file():  # a FIFO or device would block or never end when read
            raise BundleError(f"{path} ({what}) is not a regular file: the bundle was tampered with; re-copy or "
                              "re-export it")
    missing = [f for f in man.files if not (root / f).is_file()]
    if missing:
        raise BundleError(f"{root} is incomplete: missing {missing}; copy the whole bundle or re-export it")
    for rel, entry in man.files.items():
        size = (root / rel).stat().st_size
        if size != entry.size:
            raise BundleError(f"{root / rel} is {size} bytes but the manifest says {entry.size}: a truncated or "
                              "replaced copy; re-copy or re-export the bundle")
    for g in man.graphs.values():
        _check_onnx_header(root / g.file)
        _check_external_data(root, g.file)
    if verify_checksums:
        man.verify_checksums(progress=log.isEnabledFor(logging.INFO))
        return man
    for rel, entry in man.files.items():
        if entry.sample and sample_sha256(root / rel) != entry.sample:
            raise BundleError(f"{root / rel} is damaged: its contents differ from what was exported (sampled "
                              f"digest); the bundle {root} cannot be trusted: run `bridge-export verify --checksums "
                              f"{root}`, then re-copy or re-export it")
    return man


__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "GRAPHS", "BundleError", "Manifest", "GraphInfo", "TensorInfo",
           "ModelDims", "KVLayout", "SpecialTokens", "Prompts", "TextEmbeddingPrompt", "CaptionPrompt",
           "TextConventions", "Preprocessing", "TokenizerInfo", "ExactBPEInfo", "Limits", "PrecisionInfo",
           "FileEntry", "read_manifest", "parse_manifest", "manifest_digest", "sha256_file", "sample_sha256", "confined",
           "named_files"]

