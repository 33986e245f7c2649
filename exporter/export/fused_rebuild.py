"""The fused decoder rebuilt from an fp32 streamed bundle's weights (`bridge-export precision` to int8-cpu /
int4-cpu): the graph from fused_decoder, the weights streamed from the source bundle by checkpoint key."""
from __future__ import annotations

from pathlib import Path

import onnx

from bridge_export.reference_model.config import InternVLConfig

from bridge_export.exporter.export.fused_decoder import build_fused_decoder
from bridge_export.exporter.export.graph_builder import GraphBuilder
from bridge_export.exporter.export.specs import fused_decoder_spec


def bundle_keys(src_manifest, precision: str, int4=None) -> tuple[InternVLConfig, GraphBuilder, list[str]]:
    """(config, the fused decoder's builder, the checkpoint keys it reads) for a rebuild from `src_manifest`;
    ExportError in one line when that fp32 bundle does not hold them by name (a traced export)."""
    from bridge_export.exporter.export.bundle_source import decoder_source

    config = InternVLConfig.from_dict(src_manifest.model)
    b = build_fused_decoder(config, precision, int4)
    keys = sorted({k for r in b.weights.values() for k in (r.parts or (r.key,))})
    decoder_source(src_manifest, keys)  # refuses before any work
    return config, b, keys


def write_from_bundle(src_manifest, precision: str, folder: Path, int4=None) -> Path:
    """The fused decoder of `precision` rebuilt from an fp32 streamed bundle's weights (`bridge-export
    precision`), written with its own weights.bin into the new `folder`; returns the graph's path."""
    from bridge_export.exporter.export.bundle_source import decoder_source
    from bridge_export.exporter.export.internvl_graphs import check_against_spec
    from bridge_export.exporter.export.onnx_export import WEIGHTS_FILE
    from bridge_export.exporter.export.stream_export import stream_weights

    config, b, keys = bundle_keys(src_manifest, precision, int4)
    check_against_spec(b, fused_decoder_spec(config, precision))
    source, mapping = decoder_source(src_manifest, keys)
    model = b.model(int(src_manifest.versions.get("opset", 17)), {k: source.shape(k) for k in keys})
    folder.mkdir(parents=True)
    stream_weights({"text_decoder": model}, {"text_decoder": b.weights}, source, mapping, folder / WEIGHTS_FILE,
                   show_progress=False)
    path = folder / "text_decoder.onnx"
    onnx.save_model(model, str(path))
    return path
