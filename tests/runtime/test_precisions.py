"""The precision registry: one list of names, each with the operator targets it can be written for."""
import pytest

from bridge_export.runtime.precisions import PRECISIONS, PrecisionError, resolve


def test_targets_follow_the_shared_rules():
    assert resolve("int8-cpu")[1] == "onnxruntime" and resolve("int4-cpu")[1] == "onnxruntime"
    assert resolve("int8")[1] == "tensorrt"
    assert resolve("fp32")[1] == "tensorrt" and resolve("fp16", "onnxruntime")[1] == "onnxruntime"
    assert list(PRECISIONS)[:5] == ["fp32", "fp16", "int8", "int8-cpu", "int4-cpu"]


def test_refusals_are_one_line():
    with pytest.raises(PrecisionError, match="written for onnxruntime only, not --target tensorrt"):
        resolve("int4-cpu", "tensorrt")
    with pytest.raises(PrecisionError, match="unknown precision 'fp12'"):
        resolve("fp12")
