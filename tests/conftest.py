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
    import reference_model

    return reference_model.from_preset("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("tiny_ckpt")
    tiny_model.save_pretrained(d)
    return d
