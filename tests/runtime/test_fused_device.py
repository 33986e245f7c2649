"""The fused decoder (GroupQueryAttention over one shared KV buffer) on device sessions, run here on
bridge_export.runtime.gpu.memory.HostMemory: DeviceSharedKVCache against the host SharedKVCache.

HostMemory performs every allocation and copy on real host pointers (fresh blocks hold NaN bytes), and
onnxruntime binds the cache with device 'cpu', the code that binds 'cuda' on a GPU. So: the buffer's
layout and row moves equal numpy's, captions (greedy, beams, padded prompts) and the scheduler's rows
give the host path's tokens, a decode step moves only the small feeds up and the logits down, and
closing frees every byte.
"""
import dataclasses

import numpy as np
import pytest

from bridge_export import runtime
from bridge_export.runtime.gpu.memory import DeviceBuffer, HostMemory
from bridge_export.runtime.gpu.shared_kv import DeviceSharedKVCache
from bridge_export.runtime.kv_cache import SharedKVCache


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """fp32, onnxruntime target: the fused decoder (the tiny model with head_dim 16, as test_fused_decoder)."""
    from bridge_export.exporter.export.stream_export import export_model
    from bridge_export.reference_model import InternVLModel, preset_config
    from bridge_export.reference_model.loading import init_weights

    c = preset_config("tiny")
    c.qllama = dataclasses.replace(c.qllama, num_attention_heads=3)  # head_dim 16: GroupQueryAttention's multiple of 8
    model = init_weights(InternVLModel(c), 0).eval()
    return export_model(model, tmp_path_factory.mktemp("fused-device") / "b", precision="fp32", target="onnxruntime",
                        progress=lambda s: None)


@pytest.fixture(scope="module")
def host(bundle):
    with runtime.load(bundle) as p:
        assert p.fused_step is not None
        yield p


@pytest.fixture(scope="module")
def mem():
    return HostMemory()


@pytest.fixture(scope="module")
def dev(bundle, mem):
    with runtime.load(bundle, device=mem) as p:
        assert p.fused_step is not None and p.sessions["text_decoder"].memory is mem
        yield p


def _pix(n, seed=0, size=32):
    return np.random.default_rng(seed).standard_normal((n, 3, size, size), dtype=np.float32)


# -- the buffer alone ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,prefix_on_device", [(np.float32, False), (np.float32, True), (np.float16, True)])
def test_buffer_and_row_moves_equal_the_host_buffer(dtype, prefix_on_device):
    """Prefixes (numpy, device buffers, fp32 into an fp16 buffer), repeat, reorder and copy_rows: the device
    buffer equals SharedKVCache's array byte for byte after each, and no row move crosses the bus."""
    rng = np.random.default_rng(0)
    L, rows, H, cap, Dh, Q = 2, 8, 3, 12, 4, 3
    mem = HostMemory()
    host = SharedKVCache(L, rows, H, cap, Dh, dtype)
    dev = DeviceSharedKVCache(mem, L, rows, H, cap, Dh, dtype)

    def prefix(n):
        return [rng.standard_normal((n, H, Q, Dh), dtype=np.float32) for _ in range(2 * L)]

    def same():
        np.testing.assert_array_equal(dev.download(), host.data)
        np.testing.assert_array_equal(dev.lengths, host.lengths)
        assert dev.prefix_len == host.prefix_len

    def moved(fn, *args):  # row moves: device to device only
        before = mem.traffic.snapshot()
        fn(*args)
        assert mem.traffic - before == type(before)(0, 0)

    same()  # zeroed, not the NaN bytes of a fresh block
    p = prefix(2)
    staged = [mem.upload(t) for t in p] if prefix_on_device else p
    host.write_prefix(p)
    dev.write_prefix(staged)
    for b in staged if prefix_on_device else []:
        mem.release(b)
    same()

    def text(rows_, T):  # stands in for the decoder appending T slots to each of rows_
        for r in rows_:
            s = slice(host.lengths[r], host.lengths[r] + T)
            host.data[:, :, r, :, s] = rng.standard_normal((L, 2, H, T, Dh))
            for i in range(L):
                for j in range(2):  # the row's whole block, as the host has it
                    mem.upload(np.ascontiguousarray(host.data[i, j, r]),
                               into=DeviceBuffer(dev.block_ptr(i, j, r), (H, cap, Dh), dtype))
            host.lengths[r] += T
            dev.lengths[r] += T

    text([0, 1], 2)
    same()
    moved(host.repeat, 3, 2)
    moved(dev.repeat, 3, 2)
    same()
    for src in (np.array([2, 0, 0, 5, 3, 4]), np.array([1, 2, 0, 3, 5, 4]), np.arange(6)):
        text(range(6), 1)
        host.reorder(src)
        moved(dev.reorder, src)
        same()
    p = prefix(2)
    host.load_prefix(np.array([6, 7]), p)  # the scheduler's calls: fresh rows, moves, frees
    dev.load_prefix(np.array([6, 7]), p)
    same()
    p = prefix(3)
    host.load_prefix(np.array([7, 2, 4]), p)  # not ascending: one copy per row
    dev.load_prefix(np.array([7, 2, 4]), p)
    same()
    for dst, src in ((np.array([6]), np.array([0])), (np.array([0, 1]), np.array([1, 0])),
                     (np.array([3, 4, 5]), np.array([6, 6, 7]))):
        host.copy_rows(dst, src)
        moved(dev.copy_rows, dst, src)
        same()
    host.free(np.array([1, 3]))
    dev.free(np.array([1, 3]))
    same()
    with pytest.raises(ValueError, match="prefix tensor 1 has shape"):
        dev.write_prefix([np.zeros((1, H, Q, Dh), np.float32), np.zeros((1, H, Q + 1, Dh), np.float32)] * L)
    dev.close()
    dev.close()  # idempotent
    assert mem.live_bytes == 0


# -- through the pipeline -----------------------------------------------------------------------------
@pytest.mark.parametrize("beams", [1, 3])
def test_captions_equal_the_host_cache(host, dev, beams):
    """Greedy and beam search through the device buffer: the host path's tokens and scores."""
    x, prompt = _pix(2, seed=1), np.array([[1, 5, 6, 7], [1, 5, 6, 7]])
    a, sa = host.generate(x, prompt, max_new_tokens=10, min_new_tokens=3, num_beams=beams, return_scores=True)
    b, sb = dev.generate(x, prompt, max_new_tokens=10, min_new_tokens=3, num_beams=beams, return_scores=True)
    np.testing.assert_array_equal(b, a)
    np.testing.assert_array_equal(sb, sa)


def test_padded_prompts_sampling_and_text_embeddings(host, dev):
    x = _pix(2, seed=2)
    prompt = np.array([[0, 0, 1, 5], [1, 5, 6, 7]])
    mask = (np.arange(4)[None] >= np.array([[2], [0]])).astype(np.int64)
    np.testing.assert_array_equal(dev.generate(x, prompt, mask, max_new_tokens=6, num_beams=2),
                                  host.generate(x, prompt, mask, max_new_tokens=6, num_beams=2))
    kw = dict(max_new_tokens=8, do_sample=True, temperature=0.8, top_k=20, seed=5)
    np.testing.assert_array_equal(dev.generate(x[:1], prompt[1:], **kw), host.generate(x[:1], prompt[1:], **kw))
    ids = np.array([[1, 5, 9, 2, 0, 0], [1, 7, 8, 9, 10, 2]])
    np.testing.assert_array_equal(dev.encode_text(ids), host.encode_text(ids))


def test_decode_step_moves_only_the_small_feeds_and_the_logits(dev, mem):
    """Per decode step, at any past length: up the ids, seqlens_k and query_seqlens (16 bytes a row),
    down the logits; nothing allocated per step."""
    beams = 3
    x, prompt = _pix(1, seed=3), np.array([[1, 5, 6, 7, 8, 9]])
    with dev._decoder(x, prompt, None, 12, beams) as d:
        assert isinstance(d.cache, DeviceSharedKVCache)
        d.prefill()
        d.expand(beams)
        rng = np.random.default_rng(0)
        rows, live = [], None
        for _ in range(12):
            past = int(d.cache.lengths.max())
            before = mem.traffic.snapshot()
            src = rng.integers(0, beams, beams) if rows else np.array([2, 0, 1])  # the first moves every row
            logits = d.step(rng.integers(3, 100, beams), src)
            moved = mem.traffic - before
            rows.append((past, moved.up, moved.down, logits.nbytes))
            if live is None:  # the first step made the decode step's binding and the scratch; no step after it allocates
                live = mem.live_bytes
            assert mem.live_bytes == live
    assert [p for p, *_ in rows] == list(range(rows[0][0], rows[0][0] + 12))
    for _, up, down, logits in rows:
        assert (up, down) == (beams * (8 + 4 + 4), logits)


def test_close_frees_every_byte(dev, mem):
    """A request's buffer, its scratch and its bindings' device buffers are freed when it ends."""
    x, prompt = _pix(2, seed=4), np.array([[1, 5, 6, 7]] * 2)
    dev.generate(x, prompt, max_new_tokens=5, num_beams=3)  # the sessions' staging buffers grow to these shapes
    start = mem.live_bytes
    dev.generate(x, prompt, max_new_tokens=5, num_beams=3)
    dev.encode_text(np.array([[1, 5, 9, 2]]))
    assert mem.live_bytes == start
    staging = {b.ptr for s in dev.sessions.values() for b in s.staging.values()}
    assert set(mem.blocks) == staging


def test_scheduler_keeps_its_buffer_on_the_device(host, dev, mem):
    """Rows joining and leaving mid-decode on the device buffer: each request's tokens and scores are what it
    gets alone (on the device and on the host); closing the scheduler frees the buffer."""
    from bridge_export.runtime.serve.scheduler import Scheduler

    opts = [dict(max_new_tokens=7), dict(max_new_tokens=10, num_beams=3), dict(max_new_tokens=5),
            dict(max_new_tokens=8, num_beams=2), dict(max_new_tokens=9, do_sample=True, seed=4, top_k=20)]
    rng = np.random.default_rng(6)
    s = dev.preprocessing.image_size
    images = [rng.normal(size=(1, 3, s, s)).astype(np.float32) for _ in opts]
    prompts = [rng.integers(3, dev.vocab_size, size=(1, t)) for t in (3, 5, 2, 4, 3)]
    alone = [dev.generate(im, p, return_scores=True, **o) for im, p, o in zip(images, prompts, opts)]
    for (t, sc), im, p, o in zip(alone, images, prompts, opts):
        ht, hs = host.generate(im, p, return_scores=True, **o)
        np.testing.assert_array_equal(t, ht)
        np.testing.assert_array_equal(sc, hs)
    sch = Scheduler(dev, rows=5, max_length=40)
    assert isinstance(sch.cache, DeviceSharedKVCache)
    futures = []
    for im, p, o in zip(images, prompts, opts):
        futures.append(sch.submit(im, p, dev._search_config(**o)))
        sch.step()  # one arrival per step: rows join while others decode, and leave when done
    sch.run(futures)
    for f, (tokens, scores) in zip(futures, alone):
        np.testing.assert_array_equal(f.result().tokens, tokens)
        np.testing.assert_array_equal(f.result().scores, scores)
    assert sch.stats.step_rows_total > sch.stats.steps  # steps really ran several rows together
    sch.close()
    staging = {b.ptr for s in dev.sessions.values() for b in s.staging.values()}
    assert set(mem.blocks) == staging  # all that is left: the sessions' staging (batches of images differ)


class _SmallDevice(HostMemory):
    """A device that reports 1 GiB free."""

    def free_bytes(self) -> int:
        return 2**30


def test_scheduler_bound_is_the_device_free_memory(bundle, dev):
    """A device buffer is bounded by the device's free memory when the memory can tell, else by half the
    host's (HostMemory cannot tell: it is host memory)."""
    from bridge_export.runtime.serve.scheduler import Scheduler

    with runtime.load(bundle, device=_SmallDevice()) as small:
        with pytest.raises(ValueError, match=r"1.8 GiB of KV cache, more than 90% of the device's free memory \(1.0 GiB"):
            Scheduler(small, rows=10**4, max_length=small.max_positions)
        Scheduler(small, rows=2, max_length=40).close()
    with pytest.raises(ValueError, match="more than half this machine's memory"):
        Scheduler(dev, rows=10**7, max_length=dev.max_positions)


def test_gpu_check_bundle_item_on_the_fused_bundle(bundle):
    """`gpu.check --bundle` on a fused bundle decodes through the device buffer against the host one."""
    from bridge_export.runtime.gpu.check import check_bundle

    r = check_bundle(str(bundle), HostMemory(), beams=3, max_new=6)
    assert r["fused"] and r["max_logits_diff"] == 0.0 and r["logits_scale"] > 0
    assert r["ragged_logits_diff"] == 0.0 and r["ragged_slots_diff"] == 0.0 and r["kv_scale"] > 0
    assert {(up, down) for _, up, down in r["per_step"]} == {(3 * 16, 3 * 4 * runtime.read_manifest(bundle)
                                                              .dims.vocab_size)}
