"""Device KV cache on bridge_export.runtime.gpu.memory.HostMemory: out of device memory mid-request leaks nothing."""
import numpy as np
import pytest

from bridge_export.runtime.gpu.kv_cache import DeviceKVCache
from bridge_export.runtime.gpu.memory import HostMemory


class FailingMemory(HostMemory):
    """Out of device memory on the allocation numbered `fail_at` (0-based, counted after arming)."""

    def __init__(self):
        super().__init__()
        self.armed, self.n, self.fail_at = False, 0, None

    def alloc(self, nbytes):
        if self.armed:
            if self.n == self.fail_at:
                self.n += 1
                raise MemoryError("out of device memory")
            self.n += 1
        return super().alloc(nbytes)


def test_repeat_out_of_memory_leaks_nothing():
    """Out of memory while repeat() allocates its new K/V block and mask frees what it got; close() frees the rest."""
    mem = FailingMemory()
    prefix = [np.ones((1, 2, 3, 4), np.float32)] * 4
    dev = DeviceKVCache(prefix, 10, mem)
    mem.armed, mem.fail_at = True, 1  # 0: the new K/V block, 1: the new device mask
    with pytest.raises(MemoryError):
        dev.repeat(3)
    dev.close()
    assert mem.live_bytes == 0
