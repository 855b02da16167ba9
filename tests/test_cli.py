"""The command line: help, a real run, and one readable line with a non-zero status on errors."""

import subprocess
import sys

import pytest

from ditopt.cli import main


def test_sites_lists_blocks(capsys):
    assert main(["sites", "wan"]) == 0
    out = capsys.readouterr().out
    assert "blocks.1.attn2" in out and "cross" in out and "stack" in out


def test_plan_validate_against_a_model(tmp_path, capsys):
    plan = tmp_path / "p.yaml"
    plan.write_text('version: 1\nsteps: 4\nrules:\n  - {sites: "*", kind: block, action: reuse_residual, steps: [1, 3]}\n')
    assert main(["plan", "validate", str(plan), "--model", "dit"]) == 0
    assert "valid for dit" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["sites", "nosuchmodel"], "unknown model 'nosuchmodel'"),
    (["plan", "validate", "/nonexistent/plan.yaml"], "plan file not found"),
])
def test_errors_exit_non_zero_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_help_for_every_subcommand():
    for sub in ("demo", "sites", "plan"):
        r = subprocess.run([sys.executable, "-m", "ditopt.cli", sub, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage" in r.stdout


def test_bad_plan_file_is_one_line(tmp_path, capsys):
    plan = tmp_path / "bad.yaml"
    plan.write_text("version: 1\nsteps: 4\nrules:\n  - {sites: '*', action: explode}\n")
    assert main(["plan", "validate", str(plan)]) == 2
    assert "unknown action 'explode'" in capsys.readouterr().err


def test_demo_on_the_trained_image_model(capsys):
    assert main(["demo", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "   1  6/6" in out and "PSNR FORA vs full" in out and "class accuracy" in out


def test_demo_unknown_model_is_one_line(capsys):
    assert main(["demo", "--model", "nope"]) == 2
    assert "unknown demo model 'nope'" in capsys.readouterr().err
