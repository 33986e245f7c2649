"""The step-level scheduler on the tiny bundle: requests joining and leaving mid-decode get exactly what
they get alone (greedy, sampled, beam: tokens and scores), a bad request fails alone, closing fails
every waiting request, memory is refused up front."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from bridge_export import runtime
from bridge_export.runtime.serve.scheduler import Scheduler, SchedulerClosed

OPTS = [dict(max_new_tokens=7), dict(max_new_tokens=12, num_beams=3), dict(max_new_tokens=5),
        dict(max_new_tokens=9, num_beams=2), dict(max_new_tokens=11, do_sample=True, seed=4, top_k=20),
        dict(max_new_tokens=6, num_beams=4, min_new_tokens=3), dict(max_new_tokens=1)]


@pytest.fixture(scope="module")
def model16():
    """The tiny model with head_dim 16 (GroupQueryAttention's minimum multiple of 8)."""
    import dataclasses

    from bridge_export.reference_model import InternVLModel, preset_config
    from bridge_export.reference_model.loading import init_weights

    c = preset_config("tiny")
    c.qllama = dataclasses.replace(c.qllama, num_attention_heads=3)
    return init_weights(InternVLModel(c), 0).eval()


@pytest.fixture(scope="module", params=["portable", "fused", "fused-int4"])
def pipe(request, tiny_bundle, tmp_path_factory):
    """The portable decoder (per-row masks), the fused one (GroupQueryAttention, per-row seqlens_k) in fp32,
    and int4-cpu (MatMulNBits, whose batched results a request must not feel either)."""
    from bridge_export.exporter.export.stream_export import export_model

    bundle = tiny_bundle
    if request.param != "portable":
        kw = dict(precision="fp32", target="onnxruntime") if request.param == "fused" else dict(precision="int4-cpu")
        bundle = export_model(request.getfixturevalue("model16"), tmp_path_factory.mktemp("sched") / request.param,
                              progress=lambda s: None, **kw)
    with runtime.load(bundle) as p:
        assert (p.fused_step is not None) == (request.param != "portable")
        yield p


@pytest.fixture(scope="module")
def inputs(pipe):
    rng = np.random.default_rng(0)
    s = pipe.preprocessing.image_size
    images = [rng.normal(size=(1, 3, s, s)).astype(np.float32) for _ in OPTS]
    prompts = [rng.integers(3, pipe.vocab_size, size=(1, t)) for t in (3, 5, 3, 4, 2, 5, 3)]
    alone = [pipe.generate(im, p, return_scores=True, **o) for im, p, o in zip(images, prompts, OPTS)]
    return images, prompts, alone


def _check(futures, alone):
    for f, (tokens, scores) in zip(futures, alone):
        r = f.result()
        assert np.array_equal(r.tokens, tokens)
        assert np.array_equal(r.scores, scores)  # the same search on the same logits: bit for bit


def test_rows_joining_mid_decode_equal_each_request_alone(pipe, inputs):
    images, prompts, alone = inputs
    sch = Scheduler(pipe, rows=6, max_length=40)
    futures = []
    for im, p, o in zip(images, prompts, OPTS):
        futures.append(sch.submit(im, p, pipe._search_config(**o)))
        sch.step()  # one arrival per decode step: rows join while others decode and leave when done
    sch.run(futures)
    _check(futures, alone)
    assert sch.stats.requests_done == len(OPTS) and sch.stats.active_rows == 0
    assert sch.stats.step_rows_total > sch.stats.steps  # steps really ran several rows at once


def test_all_at_once_with_fewer_rows_than_requests(pipe, inputs):
    images, prompts, alone = inputs
    sch = Scheduler(pipe, rows=4, max_length=30)  # requests wait for rows and take them as others finish
    futures = [sch.submit(im, p, pipe._search_config(**o)) for im, p, o in zip(images, prompts, OPTS)]
    sch.run(futures)
    _check(futures, alone)
    assert max(sch.cache.lengths) == 0 and not sch.active


def test_streamed_tokens_arrive_step_by_step(pipe, inputs):
    images, prompts, alone = inputs
    sch = Scheduler(pipe, rows=3, max_length=30)
    got = []
    f = sch.submit(images[0], prompts[0], pipe._search_config(**OPTS[0]), on_tokens=lambda t: got.append(int(t[0])))
    other = sch.submit(images[2], prompts[2], pipe._search_config(**OPTS[2]))
    sch.run([f, other])
    assert got == list(f.result().tokens[0]) == list(alone[0][0][0])


def test_bad_request_fails_alone(pipe, inputs):
    images, prompts, alone = inputs
    sch = Scheduler(pipe, rows=4, max_length=30)
    good = sch.submit(images[0], prompts[0], pipe._search_config(**OPTS[0]))
    bad = sch.submit("not-an-image.png", prompts[1], pipe._search_config(**OPTS[2]))
    nan = sch.submit(np.full_like(images[1], np.nan), prompts[1], pipe._search_config(**OPTS[2]))
    good2 = sch.submit(images[2], prompts[2], pipe._search_config(**OPTS[2]))
    sch.run([good, bad, nan, good2])
    _check([good, good2], [alone[0], alone[2]])
    assert bad.exception() is not None and "not-an-image.png" in str(bad.exception())
    assert "NaN" in str(nan.exception())
    with pytest.raises(ValueError, match="exceeds this server's 30 per row.*max_new_tokens"):
        sch.submit(images[0], prompts[0], pipe._search_config(max_new_tokens=40))
    with pytest.raises(ValueError, match="num_beams 5 exceeds the scheduler's 4 rows"):
        sch.submit(images[0], prompts[0], pipe._search_config(num_beams=5))


def test_close_mid_batch_answers_every_waiting_request(pipe, inputs):
    images, prompts, _ = inputs
    sch = Scheduler(pipe, rows=2, max_length=40)
    futures = [sch.submit(im, p, pipe._search_config(max_new_tokens=20)) for im, p in zip(images, prompts)]
    sch.step()
    sch.step()  # two requests decoding, the rest waiting
    assert sch.stats.active_rows == 2 and sch.stats.queue_length == len(futures) - 2
    sch.close()
    for f in futures:
        assert isinstance(f.exception(timeout=5), SchedulerClosed)
    with pytest.raises(SchedulerClosed):
        sch.submit(images[0], prompts[0], pipe._search_config())


def test_thread_loop_and_close(pipe, inputs):
    images, prompts, alone = inputs
    sch = Scheduler(pipe, rows=4, max_length=40)
    sch.start()
    results = {}

    def client(i):
        results[i] = sch.submit(images[i], prompts[i], pipe._search_config(**OPTS[i])).result(timeout=60)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert np.array_equal(results[i].tokens, alone[i][0])
    long = sch.submit(images[0], prompts[0], pipe._search_config(max_new_tokens=30))
    sch.close()  # mid-decode or before: the client gets an answer either way
    assert long.done()
    assert long.exception() is None or isinstance(long.exception(), SchedulerClosed)


def test_refusals_up_front(pipe):
    with pytest.raises(ValueError, match="rows must be an integer >= 1"):
        Scheduler(pipe, rows=0)
    with pytest.raises(ValueError, match="max_length must be an integer from"):
        Scheduler(pipe, rows=2, max_length=pipe.max_positions + 1)
    with pytest.raises(ValueError, match=r"GiB of KV cache, more than half this machine's memory"):
        Scheduler(pipe, rows=10**7, max_length=pipe.max_positions)
