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


class _Deferred(HostMemory):
    """A stand-in whose stream lets each queued operation overtake the one issued before it (pairs swapped at
    sync): what a copy or memset escaping stream order would do."""

    def __init__(self):
        super().__init__()
        self.queue = []

    def copy(self, dst, src, nbytes):
        self.queue.append(lambda: HostMemory.copy(self, dst, src, nbytes))

    def memset(self, ptr, value, nbytes):
        self.queue.append(lambda: HostMemory.memset(self, ptr, value, nbytes))

    def copy_2d(self, *args):
        self.queue.append(lambda: HostMemory.copy_2d(self, *args))

    def _dtoh(self, dst, src, nbytes):  # downloads queue too (then sync), as cudaMemcpyAsync on the stream
        self.queue.append(lambda: HostMemory._dtoh(self, dst, src, nbytes))

    def sync(self):
        q, self.queue = self.queue, []
        for i in range(0, len(q) - 1, 2):
            q[i], q[i + 1] = q[i + 1], q[i]
        for op in q:
            op()


class _OffByOneRow(HostMemory):
    """A stand-in whose 2-D/3-D copies start one line too far: a wrong pitch or offset."""

    def copy_3d(self, dst, dpitch, drows, src, spitch, srows, width, height, depth):
        super().copy_3d(dst + dpitch, dpitch, drows, src, spitch, srows, width, height - 1, depth)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_geometry_and_stream_order_items_pass_on_host_memory(dtype):
    from bridge_export.runtime.gpu.check import check_geometry_2d, check_geometry_3d, check_stream_order

    mem = HostMemory()
    assert check_geometry_2d(mem, heads=3, capacity=12, head_dim=4, rows=2, start=5, length=3, dtype=dtype) == 0.0
    assert check_geometry_3d(mem, tensors=4, rows=3, heads=2, capacity=9, head_dim=4, src_rows=[2, 0, 0],
                             offset_slots=5, slots=4, dtype=dtype) == 0.0
    assert check_stream_order(mem, 8 * 1024)
    assert mem.live_bytes == 0


def test_items_catch_wrong_geometry_and_out_of_order_streams():
    from bridge_export.runtime.gpu.check import check_geometry_2d, check_geometry_3d, check_stream_order

    bad = _OffByOneRow()
    assert check_geometry_2d(bad, heads=3, capacity=12, head_dim=4, rows=2, start=5, length=3, dtype=np.float32) > 0
    assert check_geometry_3d(bad, tensors=4, rows=3, heads=2, capacity=9, head_dim=4, src_rows=[2, 0, 1],
                             offset_slots=5, slots=4, dtype=np.float32) > 0
    assert not check_stream_order(_Deferred(), 8 * 1024)


def test_main_prints_pass_or_fail_per_item(capsys):
    small = ["--device", "host", "--layers", "2", "--heads", "2", "--head-dim", "4", "--beams", "3", "--queries", "5",
             "--prompt", "3", "--steps", "6", "--time-limit", "120"]
    assert main(small) == 0
    out = capsys.readouterr().out.splitlines()
    items = [line.split(":")[0] for line in out if line.startswith(("PASS ", "FAIL "))]
    assert items == ["PASS geometry 2-D float32", "PASS geometry 3-D float32", "PASS geometry 2-D float16",
                     "PASS geometry 3-D float16", "PASS stream order", "PASS device cache float32",
                     "PASS device cache float16"]
    assert out[-1] == "PASS"


def test_a_broken_memory_fails_its_items_and_the_run(monkeypatch, capsys):
    from bridge_export.runtime.gpu import check, memory

    monkeypatch.setattr(memory, "HostMemory", _OffByOneRow)
    assert check.main(["--device", "host", "--layers", "1", "--heads", "2", "--head-dim", "4", "--beams", "2",
                       "--queries", "3", "--prompt", "2", "--steps", "3"]) == 1
    out = capsys.readouterr().out
    assert "FAIL geometry 2-D float32" in out and "FAIL device cache float32" in out and out.splitlines()[-1] == "FAIL"
