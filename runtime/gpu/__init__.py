"""The GPU wing: CUDA memory, the device KV cache, device-bound sessions, TensorRT sessions and sidecars, the GPU check."""
