"""The device KV cache and the device-bound onnxruntime session, on host memory (bridge_export.runtime.gpu.memory.HostMemory).

HostMemory performs every allocation and copy the device code issues on real host pointers (fresh
blocks hold NaN bytes, as uninitialised device memory may), so offsets, pitches, beam reorders and
onnxruntime's I/O binding (device 'cpu', the same code as 'cuda') are checked against the numpy cache,
and the bytes crossing between host and device are counted per decode step.
"""
import numpy as np
import pytest

from bridge_export.runtime.gpu.kv_cache import DeviceKVCache
from bridge_export.runtime.gpu.memory import HostMemory
from bridge_export.runtime.kv_cache import CachedDecoder, KVCache


def _assert_same(mem, host, dev):
    for h, d in zip(host.buffers, dev.buffers):
        np.testing.assert_array_equal(mem.download(d), h)
    np.testing.assert_array_equal(dev.mask, host.mask)
    # the device mask is a decode step's attention_mask feed: the slots, then the new token's 1
    np.testing.assert_array_equal(mem.download(dev.dmask), host.attention_feed(np.ones((host.rows, 1), np.int64)))
    assert dev.length == host.length


@pytest.mark.parametrize("prefix_on_device", [False, True])
def test_device_cache_matches_host_cache(prefix_on_device):
    rng = np.random.default_rng(0)
    rows, H, Q, Dh, cap = 2, 3, 4, 5, 12
    prefix = [rng.standard_normal((rows, H, Q, Dh), dtype=np.float32) for _ in range(4)]
    mem = HostMemory()
    staged = [mem.upload(p) for p in prefix] if prefix_on_device else prefix
    host, dev = KVCache(prefix, cap), DeviceKVCache(staged, cap, mem)
    for b in staged if prefix_on_device else []:
        mem.release(b)
    _assert_same(mem, host, dev)  # unused slots are zero on both (fresh blocks are NaN bytes here)

    def step(T, mask_value=1):
        new = [rng.standard_normal((host.rows, H, T, Dh), dtype=np.float32) for _ in range(4)]
        mask = np.full((host.rows, T), mask_value, np.int64)
        host.write(new, mask)
        bufs = [mem.upload(a) for a in new]
        before = mem.traffic.snapshot()
        dev.write(bufs, mask)
        # a decode step's (one slot of 1s) is device to device only; a prompt's mask (or a padded one) goes up
        assert mem.traffic - before == type(before)(0 if T == 1 and mask_value else mask.nbytes, 0)
        for b in bufs:
            mem.release(b)

    step(3)  # prompt prefill
    _assert_same(mem, host, dev)
    before = mem.traffic.snapshot()
    host.repeat(3)  # beams
    dev.repeat(3)
    assert mem.traffic - before == type(before)(0, 0)
    _assert_same(mem, host, dev)
    for src in (np.array([0, 0, 1, 4, 3, 3]), np.array([2, 1, 0, 5, 5, 4]), np.arange(6)):
        step(1, mask_value=int(src[0] % 2))
        host.reorder(src)
        before = mem.traffic.snapshot()
        dev.reorder(src)
        assert mem.traffic - before == type(before)(0, 0)
        _assert_same(mem, host, dev)
    with pytest.raises(ValueError, match="KV cache full"):
        step(cap)
    dev.close()
    dev.close()  # idempotent
    assert mem.live_bytes == 0


def test_device_cache_rejects_mismatched_present():
    mem = HostMemory()
    with pytest.raises(ValueError, match=r"prefix tensor 1 has shape \[1, 2, 2, 4\]"):
        DeviceKVCache([np.zeros((1, 2, 3, 4), np.float32), np.zeros((1, 2, 2, 4), np.float32)], 8, mem)
    assert mem.live_bytes == 0  # what the failed constructor allocated was freed
    with DeviceKVCache([np.zeros((1, 2, 3, 4), np.float32)] * 2, 8, mem) as dev:
        bad = mem.upload(np.zeros((1, 2, 1, 5), np.float32))
        with pytest.raises(ValueError, match=r"present tensor 0 is float32\[1, 2, 1, 5\]"):
            dev.write([bad, bad], np.ones((1, 1), np.int64))
        mem.release(bad)
    assert mem.live_bytes == 0


def test_generation_on_device_memory_equals_cpu(tiny_bundle):
    """runtime.load(device=DeviceMemory): onnxruntime's I/O bound in device memory (here 'cpu')."""
    from bridge_export import runtime

    mem = HostMemory()
    with runtime.load(tiny_bundle) as plain, runtime.load(tiny_bundle, device=mem) as dev:
        x = np.random.default_rng(4).standard_normal((2, 3, 32, 32), dtype=np.float32)
        prompt = np.array([[1, 5, 6, 7]] * 2)
        for beams in (1, 3):
            np.testing.assert_array_equal(dev.generate(x, prompt, max_new_tokens=8, num_beams=beams),
                                          plain.generate(x, prompt, max_new_tokens=8, num_beams=beams))
        streamed = np.stack(list(dev.iter_generate(x, prompt, max_new_tokens=5)), axis=1)
        np.testing.assert_array_equal(streamed, plain.generate(x, prompt, max_new_tokens=5))
        ids = np.array([[1, 5, 9, 2, 0], [1, 7, 8, 9, 2]])
        np.testing.assert_allclose(dev.encode_text(ids), plain.encode_text(ids), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(dev.encode_image(x, "G"), plain.encode_image(x, "G"), rtol=1e-6, atol=1e-6)
        staging = {b.ptr for s in dev.sessions.values() for b in s.staging.values()}
        assert set(mem.blocks) == staging  # every request's cache was freed when it ended
    with pytest.raises(RuntimeError, match="closed"):
        dev.encode_text(ids)


def _step_traffic(pipe, mem, prompt_len, max_new, beams, device_cache=True):
    """Per decode step: (past length, bytes up, bytes down, logits bytes) through `mem`."""
    rng = np.random.default_rng(prompt_len)
    x = rng.standard_normal((1, 3, 32, 32), dtype=np.float32)
    ids = rng.integers(3, 100, (1, prompt_len))
    dec = pipe._decoder(x, ids, None, max_new, beams)
    if not device_cache:  # the cache in host memory, fed to the same device session every step
        prefix = [mem.download(b) for b in dec.cache.buffers]
        prefix = [p[:, :, :dec.cache.prefix_len] for p in prefix]
        dec.cache.close()
        dec = CachedDecoder(dec.sess, dec.names, KVCache(prefix, dec.cache.capacity), dec.prompt_ids,
                            dec.prompt_mask)
    rows = []
    with dec:
        dec.prefill()
        dec.expand(beams)
        for _ in range(max_new):
            past = dec.cache.length
            before = mem.traffic.snapshot()
            logits = dec.step(rng.integers(3, 100, beams), rng.integers(0, beams, beams))
            moved = mem.traffic - before
            rows.append((past, moved.up, moved.down, logits.nbytes))
    return rows, dec.cache.capacity


def test_host_device_bytes_per_step_do_not_depend_on_past_length(tiny_bundle):
    """Per step only ids and positions go up and the logits come down, at any past length."""
    from bridge_export import runtime

    mem = HostMemory()
    with runtime.load(tiny_bundle, device=mem) as pipe:
        beams = 3
        short, cap = _step_traffic(pipe, mem, prompt_len=2, max_new=14, beams=beams)
        long_, cap2 = _step_traffic(pipe, mem, prompt_len=12, max_new=4, beams=beams)
        assert cap == cap2  # same capacity, past lengths from 98 to 121 between the two requests
        host_cache, _ = _step_traffic(pipe, mem, prompt_len=12, max_new=4, beams=beams, device_cache=False)
        dec, q = pipe.sessions["text_decoder"], pipe.num_query
        kv = sum(int(np.prod([beams] + dec.inputs[n].shape[1:2] + [cap] + dec.inputs[n].shape[3:])) * 4
                 for names in pipe.kv_names for n in names[:2])
    want_up = beams * 8 + beams * 8  # input_ids, position_ids (the attention mask is kept on the device)
    print(f"\nper decode step, {beams} beams, cache capacity {cap} slots ({kv} bytes of K/V):")
    print("  past  bytes up  bytes down   (device cache)")
    for past, up, down, logits in short + long_:
        print(f"  {past:4d}  {up:8d}  {down:10d}")
        assert (up, down) == (want_up, logits)
    assert len({(up, down) for _, up, down, _ in short + long_}) == 1
    pasts = [past for past, *_ in short + long_]
    assert (min(pasts), max(pasts)) == (q + 2, q + 15)  # past lengths from prompt 2 to prompt 12 + 3 tokens
    for past, up, down, _ in host_cache:  # the counter sees the cache when it does cross the bus
        print(f"  {past:4d}  {up:8d}  {down:10d}   (host cache, same session)")
        assert up == want_up + kv + beams * (cap + 1) * 8 and down > 0  # K/V and the mask go up each step


def test_cuda_missing_is_one_clear_line(tiny_bundle):
    """Without onnxruntime's CUDA provider, cuda-python or a driver: one line saying what to do."""
    from bridge_export import runtime
    from bridge_export.runtime.gpu.cuda import CudaError, CudaMemory, parse_device

    try:
        mem = CudaMemory(0)
    except CudaError as e:
        msg = str(e)
        assert "\n" not in msg and ("pip install" in msg or "driver" in msg), msg
    else:  # a GPU machine: the device is usable, nothing to report
        mem.close()
        pytest.skip("a CUDA device is present here")
    with pytest.raises(RuntimeError, match="device='cpu'"):
        runtime.load(tiny_bundle, device="cuda:0")
    with pytest.raises(ValueError, match="TensorRT runs on a GPU"):
        runtime.load(tiny_bundle, backend="tensorrt", device="cpu")
    with pytest.raises(ValueError, match="'cpu', 'cuda' or 'cuda:N'"):
        parse_device("gpu0")
    assert parse_device("cuda") == 0 and parse_device("cuda:3") == 3
