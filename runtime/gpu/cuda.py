"""CUDA through NVIDIA's cuda-python (`cuda.bindings.runtime`): device queries and `CudaMemory`.

Imported lazily: `import bridge_export.runtime` works without cuda-python, a driver or a GPU; the first use
says in one line what is missing.
"""
from __future__ import annotations

from bridge_export.runtime.gpu.memory import DeviceMemory
from bridge_export.runtime.errors import UserError


class CudaError(UserError, RuntimeError):
    """A CUDA runtime call failed, or no usable CUDA driver/GPU (or cuda-python) is present."""


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as e:
        raise CudaError("cuda-python is not installed: pip install 'bridge-export[gpu]' (or cuda-bindings), "
                        "or run on device='cpu'") from e
    return cudart


def _bindings_version() -> str:
    try:
        import cuda.bindings

        return cuda.bindings.__version__
    except (ImportError, AttributeError):
        return "?"


def check(result):
    """Unpack a cuda-python result `(cudaError_t, *values)`; raise CudaError naming the failure."""
    cudart = _cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise CudaError(_describe(err))
    return values[0] if len(values) == 1 else (tuple(values) or None)


def _describe(err) -> str:
    cudart = _cudart()
    name = cudart.cudaGetErrorName(err)[1].decode()
    text = cudart.cudaGetErrorString(err)[1].decode()
    if err in (cudart.cudaError_t.cudaErrorInsufficientDriver, cudart.cudaError_t.cudaErrorNoDevice):
        driver = cudart.cudaDriverGetVersion()[1]
        runtime = cudart.cudaRuntimeGetVersion()[1]
        if not driver:
            return (f"no NVIDIA driver/GPU found ({name}: {text}): install the NVIDIA driver on a GPU machine, "
                    "or run on device='cpu'")
        return (f"{name}: {text} (driver supports CUDA {driver // 1000}.{driver % 1000 // 10}, cuda-bindings "
                f"{_bindings_version()} is built for CUDA {runtime // 1000}.{runtime % 1000 // 10}): install the "
                f"cuda-bindings matching the driver, e.g. pip install 'cuda-bindings>={driver // 1000},"
                f"<{driver // 1000 + 1}', or update the driver")
    return f"CUDA error {int(err)} {name}: {text}"


def device_count() -> int:
    """Number of CUDA devices; CudaError (one line, what to do) when there is no driver or GPU."""
    n = check(_cudart().cudaGetDeviceCount())
    if not n:
        raise CudaError("no CUDA device is visible (check CUDA_VISIBLE_DEVICES), or run on device='cpu'")
    return n


def device_info(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor') of a device."""
    device_count()
    props = check(_cudart().cudaGetDeviceProperties(device))
    name = props.name.split(b"\0", 1)[0].decode() if isinstance(props.name, bytes) else str(props.name)
    return name, f"{props.major}.{props.minor}"


def parse_device(device: str) -> int:
    """The ordinal of 'cuda' / 'cuda:N'; ValueError for anything else."""
    if device == "cuda":
        return 0
    head, _, ordinal = device.partition(":")
    if head != "cuda" or not ordinal.isdigit():
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return int(ordinal)


class CudaMemory(DeviceMemory):
    """DeviceMemory on one GPU through cuda-python: cudaMalloc/cudaFree and async copies on one stream."""

    ort_device = "cuda"

    def __init__(self, device: int = 0):
        super().__init__()
        self.rt = cudart = _cudart()
        n = device_count()
        if device >= n:
            raise CudaError(f"cuda:{device} requested but only {n} CUDA device(s) are visible")
        self.device_id = device
        check(cudart.cudaSetDevice(device))
        self.stream = check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))
        self._h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._d2d = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice

    @property
    def stream_handle(self) -> int:
        """The stream as an integer (what TensorRT's execute_async_v3 takes)."""
        return int(self.stream)

    def alloc(self, nbytes: int) -> int:
        return int(check(self.rt.cudaMalloc(max(1, int(nbytes)))))

    def free(self, ptr: int) -> None:
        check(self.rt.cudaFree(ptr))

    def memset(self, ptr: int, value: int, nbytes: int) -> None:
        check(self.rt.cudaMemsetAsync(ptr, value, nbytes, self.stream))

    def _htod(self, dst: int, src: int, nbytes: int) -> None:
        check(self.rt.cudaMemcpyAsync(dst, src, nbytes, self._h2d, self.stream))

    def _dtoh(self, dst: int, src: int, nbytes: int) -> None:
        check(self.rt.cudaMemcpyAsync(dst, src, nbytes, self._d2h, self.stream))

    def copy(self, dst, src, nbytes) -> None:
        if nbytes:
            check(self.rt.cudaMemcpyAsync(dst, src, nbytes, self._d2d, self.stream))

    def copy_2d(self, dst, dpitch, src, spitch, width, height) -> None:
        if width and height:
            check(self.rt.cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, self._d2d, self.stream))

    def copy_3d(self, dst, dpitch, drows, src, spitch, srows, width, height, depth) -> None:
        if not (width and height and depth):
            return
        rt = self.rt
        p = rt.cudaMemcpy3DParms()
        # linear memory: extents in bytes; a slab is pitch x rows bytes apart
        p.srcPtr = rt.make_cudaPitchedPtr(src, spitch, spitch, srows)
        p.dstPtr = rt.make_cudaPitchedPtr(dst, dpitch, dpitch, drows)
        p.extent = rt.make_cudaExtent(width, height, depth)
        p.kind = self._d2d
        check(rt.cudaMemcpy3DAsync(p, self.stream))

    def sync(self) -> None:
        check(self.rt.cudaStreamSynchronize(self.stream))

    def free_bytes(self) -> int:
        """Free memory on this device now (cudaMemGetInfo, which reports the calling thread's current device)."""
        check(self.rt.cudaSetDevice(self.device_id))
        free, _total = check(self.rt.cudaMemGetInfo())
        return int(free)

    def close(self) -> None:
        if getattr(self, "stream", None) is not None:
            self.sync()
            check(self.rt.cudaStreamDestroy(self.stream))
            self.stream = None
