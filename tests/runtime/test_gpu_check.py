"""bridge_export.runtime.gpu.check: its comparison logic on host memory here, the real run on a GPU (skipped without one)."""
import numpy as np
import pytest

from bridge_export.runtime.gpu.memory import HostMemory
from bridge_export.runtime.gpu.check import check_bundle, check_cache, main


def _cuda_or_reason():
    from bridge_export.runtime.gpu.cuda import CudaError, CudaMemory

    try:
        CudaMemory(0).close()
    except CudaError as e:
        return str(e)
    return None


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_cache_check_logic_on_host_memory(dtype):
    mem = HostMemory()
    r = check_cache(mem, layers=2, heads=3, head_dim=4, beams=3, queries=5, prompt=3, steps=7, dtype=dtype)
    assert r["max_abs_diff"] == 0.0 and r["comparisons"] == 4
    assert r["cache_call_bytes"] == (0, 0)
    cap = 5 + 3 + 7  # queries + prompt + steps
    # once per request: 2 layers x K, V of the prefix, the mask (1 row, cap + 1), the row of 1s, the prompt's mask
    assert r["prefix_bytes_up"] == 4 * 3 * 5 * 4 * np.dtype(dtype).itemsize + (cap + 1) * 8 + 8 + 3 * 8
    assert mem.live_bytes == 0


def test_bundle_check_logic_on_host_memory(tiny_bundle):
    r = check_bundle(str(tiny_bundle), HostMemory(), beams=3, max_new=6)
    assert r["max_logits_diff"] == 0.0 and r["logits_scale"] > 0  # same CPU kernels on both sides
    assert len({(up, down) for _, up, down in r["per_step"]}) == 1
    assert [p for p, _, _ in r["per_step"]] == list(range(r["per_step"][0][0], r["per_step"][0][0] + 6))


def test_without_gpu_it_fails_in_one_line(capsys):
    reason = _cuda_or_reason()
    if reason is None:
        pytest.skip("a CUDA device is present: the real check runs in test_gpu_check_passes_on_a_gpu")
    assert main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("FAIL: ") and "\n" not in err, err


@pytest.mark.gpu
def test_gpu_check_passes_on_a_gpu():
    reason = _cuda_or_reason()
    if reason is not None:
        pytest.skip(f"needs an NVIDIA GPU and cuda-python: {reason}")
    assert main(["--layers", "4", "--steps", "12"]) == 0
