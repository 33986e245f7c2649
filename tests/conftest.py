"""Shared fixtures: the shared data folder (skip when absent) and tiny models."""
from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GOLDEN = SHARED / "internvl-tiny-golden"
TOKENIZER = SHARED / "internvl-tokenizer"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN / "golden.npz").is_file():
        pytest.skip(f"{GOLDEN} is absent: the golden fixture lives in ../shared/data beside the clone")
    return GOLDEN


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    if not (TOKENIZER / "tokenizer.model").is_file():
        pytest.skip(f"{TOKENIZER} is absent: the real tokenizer lives in ../shared/data beside the clone")
    return TOKENIZER


@pytest.fixture(scope="session")
def tiny_model():
    from bridge_export import reference_model

    return reference_model.from_preset("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("tiny_ckpt")
    tiny_model.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_model):
    """An fp32 bundle of the tiny preset (seed 0), with the golden-free synthetic path."""
    from bridge_export.exporter.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return export_bundle(tiny_model, out, progress=lambda s: None)


@pytest.fixture(scope="session")
def golden_bundle(tmp_path_factory, golden_dir):
    """The golden checkpoint exported, plus the model (for parity against the original's arrays)."""
    from bridge_export import reference_model
    from bridge_export.exporter.export.bundle import export_bundle

    model = reference_model.load_pretrained(golden_dir)
    out = tmp_path_factory.mktemp("bundles") / "golden"
    return export_bundle(model, out, checkpoint=golden_dir, progress=lambda s: None), model


@pytest.fixture(scope="session")
def tiny_text_bundle(tmp_path_factory, tiny_model, tiny_checkpoint):
    """The tiny preset exported with a word-level tokenizer (so the user-level text API works)."""
    import sys

    from bridge_export.exporter.export.bundle import export_bundle

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import word_tokenizer

    tok_dir = tmp_path_factory.mktemp("tok")
    word_tokenizer(tiny_model.config.qllama.vocab_size, tok_dir / "tokenizer.json")
    out = tmp_path_factory.mktemp("bundles") / "tiny_text"
    return export_bundle(tiny_model, out, tokenizer=tok_dir, progress=lambda s: None)


@pytest.fixture(autouse=True)
def _logs_reach_caplog():
    """Commands run in-process (click's runner) send bridge-export's log to stderr and stop propagation,
    as the CLI does; restore propagation so a later test's caplog sees the messages again."""
    import logging

    yield
    logging.getLogger("bridge_export").propagate = True
