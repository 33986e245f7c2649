"""share_threads: every later onnxruntime session of the process runs on one global intra-op pool, with
the same results as per-session pools; the pool is sized once. Each case runs in its own process
(the pool is a property of the process)."""
import json
import subprocess
import sys

import numpy as np
import pytest

CHILD = r"""
import json, sys
import numpy as np
from bridge_export import runtime
from bridge_export.runtime.sessions import ort_session_options, share_threads
bundle, out = sys.argv[1], {}
if sys.argv[2] == "per-session":
    pipe = runtime.load(bundle, threads=1)
else:
    share_threads(1)
    share_threads(1)  # the same size again: nothing to do
    try:
        share_threads(2)
        out["resize"] = "accepted"
    except ValueError as e:
        out["resize"] = str(e)
    out["per_session_threads"] = ort_session_options(threads=2).use_per_session_threads
    pipe = runtime.load(bundle, threads=2)  # `threads` is the shared pool's now
s = pipe.preprocessing.image_size
x = np.random.default_rng(0).standard_normal((2, 3, s, s)).astype(np.float32)
out["emb"] = pipe.encode_image(x, "InternVL-C").tolist()
out["tokens"] = pipe.generate(x, np.array([[1, 2], [1, 3]]), max_new_tokens=4).tolist()
print(json.dumps(out))
"""


def _child(bundle, mode):
    r = subprocess.run([sys.executable, "-c", CHILD, str(bundle), mode], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_shared_pool_gives_the_per_session_results(tiny_text_bundle):
    shared, alone = _child(tiny_text_bundle, "shared"), _child(tiny_text_bundle, "per-session")
    assert shared["per_session_threads"] is False
    assert "cannot become 2" in shared["resize"] and "another process" in shared["resize"]
    np.testing.assert_allclose(shared["emb"], alone["emb"], rtol=1e-5, atol=1e-6)
    assert shared["tokens"] == alone["tokens"]


def test_bad_size_is_refused_before_onnxruntime_sees_it():
    from bridge_export.runtime.sessions import share_threads

    with pytest.raises(ValueError, match="threads must be an integer"):
        share_threads(0)
