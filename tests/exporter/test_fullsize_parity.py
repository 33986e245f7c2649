"""The full-size parity script, run at tiny size: PASS on a matching bundle, FAIL on another model's."""
from bridge_export.exporter.bench.fullsize_parity import main
from bridge_export.reference_model.checkpoint_writer import write_random_checkpoint


def test_parity_script_end_to_end_on_tiny(tmp_path, capsys):
    assert main(["--workdir", str(tmp_path / "w"), "--preset", "tiny", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "image_embeds G" in out and "greedy" in out and out.rstrip().endswith("PASS")
    assert list((tmp_path / "w").iterdir()) == []  # checkpoint and bundle removed (no --keep)


def test_parity_script_fails_on_a_different_checkpoint(tiny_bundle, tiny_checkpoint, tmp_path, capsys):
    assert main(["--workdir", str(tmp_path), "--checkpoint", str(tiny_checkpoint), "--bundle", str(tiny_bundle),
                 "--lean"]) == 0
    other = write_random_checkpoint(tmp_path / "other", "tiny", dtype="bf16", seed=9, progress=False)
    assert main(["--workdir", str(tmp_path), "--checkpoint", str(other), "--bundle", str(tiny_bundle)]) == 1
    assert capsys.readouterr().out.rstrip().endswith("FAIL")
    assert tiny_bundle.is_dir() and other.is_dir()  # given, not written by the script: never deleted
