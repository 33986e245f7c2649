"""Decode speed as a fraction of the GEMV bandwidth measured in the same process, and the per-operator
profile of a decode step (fullsize decode / profile), on the digits shape (head_dim 16: fused decoder)."""
import pytest

from bridge_export.exporter.bench import fullsize
from bridge_export.exporter.export.stream_export import export_model


@pytest.fixture(scope="module")
def digits_bundles(tmp_path_factory):
    from bridge_export import reference_model

    model = reference_model.from_preset("digits", seed=0)
    root = tmp_path_factory.mktemp("decode_bw")
    portable = export_model(model, root / "portable", precision="int4-cpu", fused_decoder=False)
    fused = export_model(model, root / "fused", precision="int4-cpu")
    return portable, fused


def test_decode_reports_fractions_of_both_gemv_probes(digits_bundles):
    d = fullsize.decode_compare(list(digits_bundles), threads=1, steps=2, rounds=2, gemv_gib=0.01)
    assert set(d["gemv"]) == {"fp32 GEMV", "int4 GEMV"} and all(v > 0 for v in d["gemv"].values())
    portable, fused = d["portable"], d["fused"]
    assert portable["fused"] is False and fused["fused"] is True
    for r in (portable, fused):
        assert r["precision"] == "int4-cpu" and r["decode_tokens_per_s"] > 0
        # the fraction is weights read per second over the probe's bandwidth, from the same figures
        read = r["decode_tokens_per_s"] * r["weight_bytes_per_token"] / 1e9
        assert r["fraction_of_fp32_gemv"] == pytest.approx(read / d["gemv"]["fp32 GEMV"], rel=0.05)
    assert portable["vs_first"] == 1.0
    table = fullsize.format_decode(d)
    assert "| fused | int4-cpu | True |" in table and "fp32 GEMV" in table


def test_probe_reads_the_bytes_it_says():
    run, nbytes = fullsize.gemv_probe(1, 0.01, int4=True)
    run()
    # 4096 inputs in blocks of 32: 16 B of nibbles + 4 B scale + 1/2 B zero point per block
    assert nbytes % (128 * 16 + 128 * 4 + 64) == 0


def test_profile_names_the_decoders_kernels(digits_bundles):
    prof = fullsize.profile_decode(digits_bundles[1], threads=1, steps=2)
    ops = prof["ops"]
    assert "GroupQueryAttention" in ops and "MatMulNBits" in ops
    assert 0.99 <= sum(v["share"] for v in ops.values()) <= 1.0 or len(ops) == 8
    assert prof["kernel_ms_per_step"] > 0
