"""bridge_export.runtime.gpu.cuda without a GPU: every cuda-python call CudaMemory makes accepts its arguments (the
bindings convert them before calling the driver, so a wrong type raises TypeError here, while the
missing driver answers with an error code that becomes a one-line CudaError)."""
import numpy as np
import pytest


def _no_gpu_bindings():
    cudart = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python (cuda-bindings) is not installed")
    err, n = cudart.cudaGetDeviceCount()
    if err == cudart.cudaError_t.cudaSuccess and n:
        pytest.skip("a CUDA device is present: bogus pointers would be dereferenced (bridge_export.runtime.gpu.check runs there)")
    return cudart


def test_every_call_accepts_its_arguments_and_fails_in_one_line():
    cudart = _no_gpu_bindings()
    from bridge_export.runtime.gpu.cuda import CudaError, CudaMemory
    from bridge_export.runtime.gpu.memory import Traffic

    m = object.__new__(CudaMemory)  # what __init__ sets, without the stream it cannot create here
    m.traffic, m.rt, m.stream, m.device_id = Traffic(), cudart, cudart.cudaStream_t(0), 0
    m._h2d, m._d2h, m._d2d = (cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                              cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                              cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice)
    host = np.zeros(16, np.uint8)
    calls = {"alloc": lambda: m.alloc(16), "free": lambda: m.free(0x1000), "memset": lambda: m.memset(0x1000, 0, 16),
             "htod": lambda: m._htod(0x1000, host.ctypes.data, 16), "dtoh": lambda: m._dtoh(host.ctypes.data, 0x1000, 16),
             "copy": lambda: m.copy(0x1000, 0x2000, 16), "copy_2d": lambda: m.copy_2d(0x1000, 32, 0x2000, 16, 16, 2),
             "copy_3d": lambda: m.copy_3d(0x1000, 32, 4, 0x2000, 16, 2, 16, 2, 3), "sync": m.sync,
             "init": lambda: CudaMemory(0)}
    for name, call in calls.items():
        with pytest.raises(CudaError) as e:
            call()
        assert "\n" not in str(e.value) and "driver" in str(e.value), (name, str(e.value))
    assert m.stream_handle == 0
