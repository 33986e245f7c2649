"""The CLI's shape: commands grouped by task in --help, help on every option, one meaning per name."""
from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from bridge_export.exporter.cli import main
from bridge_export.exporter.cli.group import SECTIONS


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _commands(group=main, prefix=""):
    for name, cmd in group.commands.items():
        yield prefix + name, cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + name + " ")


def test_help_lists_commands_by_task_in_full():
    r = _run("--help")
    assert r.exit_code == 0
    text = r.output
    heads = [SECTIONS[k] for k in ("start", "export", "run", "check", "deploy", "tools")]
    positions = [text.index(h + ":") for h in heads]
    assert positions == sorted(positions), "sections out of order"
    # each command sits under its section
    export_block = text[text.index(SECTIONS["export"]):text.index(SECTIONS["run"])]
    for name in ("onnx", "precision", "random-checkpoint", "engine"):
        assert f"\n  {name} " in export_block
    run_block = text[text.index(SECTIONS["run"]):text.index(SECTIONS["check"])]
    assert all(f"\n  {n} " in run_block for n in ("caption", "classify", "embed"))
    body = text[text.index(SECTIONS["start"]):]
    assert "..." not in body  # descriptions are never cut off


def test_every_option_and_command_has_help():
    missing = []
    for name, cmd in _commands():
        if not (cmd.help or "").strip():
            missing.append(name)
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip():
                missing.append(f"{name} {p.opts[0]}")
    assert missing == []


# The options whose meaning must not differ between commands, and what each help must say.
ONE_MEANING = {"--max-batch": "largest batch", "--instances": "entry-point model", "--threads": "threads",
               "--workers": "worker", "--precision": "fp16", "--preset": "preset", "--out": "", "--overwrite": "replace"}


@pytest.mark.parametrize("opt,phrase", sorted(ONE_MEANING.items()))
def test_an_option_name_means_one_thing(opt, phrase):
    uses = [(name, p) for name, cmd in _commands() for p in cmd.params
            if isinstance(p, click.Option) and opt in p.opts and not p.hidden]
    assert uses, opt
    assert all(phrase in (p.help or "") for _, p in uses), [(n, p.help) for n, p in uses]


def test_presets_come_from_the_registry():
    from bridge_export.reference_model.config import PRESETS

    r = _run("onnx", "--help")
    for name in PRESETS:
        assert name in r.output
    r = _run("random-checkpoint", "--preset", "huge", "--out", "x")
    assert r.exit_code == 2 and "choose one of " + ", ".join(PRESETS) in r.output


def test_precisions_come_from_the_registry():
    from bridge_export.runtime.precisions import PRECISIONS

    r = _run("onnx", "--help")
    assert all(f"{name}:" in r.output.replace("\n", " ") or name in r.output for name in PRECISIONS)
    assert "--target" in r.output and "--target" in _run("precision", "--help").output


def test_tools_hand_their_arguments_over():
    r = _run("tools", "--help")
    assert r.exit_code == 0 and "gpu-check" in r.output and "train-demo" in r.output
    r = _run("tools", "trt-stamp", "nonsense")  # the tool's own usage line, its own exit status
    assert r.exit_code == 2


def test_deprecated_spelling_warns_and_still_works(tiny_bundle, tmp_path):
    r = _run("precision", tiny_bundle, "--fp16", "--out", tmp_path / "h")
    assert r.exit_code == 0, r.output
    assert "--fp16 is deprecated: use --precision fp16" in r.output
    assert "--fp16" not in _run("precision", "--help").output  # hidden


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "bridge_export.exporter.cli", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "Usage: bridge-export" in out.stdout
