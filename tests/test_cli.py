"""The command line: help, a real run, and one readable line with a non-zero status on errors."""

import re
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
    for sub in ("demo", "sites", "plan", "diff", "profile", "bench"):
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


def test_sites_of_a_zoo_model_and_a_class_name(capsys):
    assert main(["sites", "wan-digits"]) == 0
    assert "blocks.0.attn2" in capsys.readouterr().out
    assert main(["sites", "DiTTransformer2DModel"]) == 0
    assert "transformer_blocks.0.attn1" in capsys.readouterr().out


_OWN_MODEL = """
import torch
from diffusers import DiTTransformer2DModel


def build():
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    return model, dict(hidden_states=torch.randn(1, 4, 8, 8), timestep=torch.tensor([500]),
                       class_labels=torch.tensor([1]))


class Renamed(torch.nn.Module):  # the timestep under another name
    def __init__(self):
        super().__init__()
        self.inner = build()[0]

    def forward(self, hidden_states, t, class_labels):
        return self.inner(hidden_states, timestep=t, class_labels=class_labels).sample


def renamed():
    model, inputs = build()
    return Renamed(), dict(hidden_states=inputs["hidden_states"], t=inputs["timestep"],
                           class_labels=inputs["class_labels"])


def raising():
    raise ValueError("no weights here")


def refused():  # inputs the model itself refuses: 3 channels where it takes 4
    model, inputs = build()
    return model, dict(inputs, hidden_states=torch.randn(1, 3, 8, 8))


def not_a_pair():
    return 3
"""


def test_sites_and_diff_of_the_users_own_model_by_function(tmp_path, monkeypatch, capsys):
    """MODEL may name the user's own function (``file.py:function`` or ``module:function``) that
    returns the model and one call's keyword inputs: the command line on a model of one's own."""
    path = tmp_path / "mine.py"
    path.write_text(_OWN_MODEL)
    assert main(["sites", f"{path}:build"]) == 0
    assert "transformer_blocks.1.attn1" in capsys.readouterr().out
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["diff", "mine:build", "--preset", "fora-2", "--format", "text"]) == 0
    assert "wrote ditopt-diff-mine-build.txt" in capsys.readouterr().out
    assert (tmp_path / "ditopt-diff-mine-build.txt").read_text()


@pytest.mark.parametrize("spec, message", [
    ("{dir}/nope.py:build", "no such file"),
    ("no_such_module_here:build", "cannot import 'no_such_module_here'"),
    ("{dir}/mine.py:missing", "the module has no function 'missing'"),
    ("{dir}/mine.py:not_a_pair", "expected it to return (model, dict of forward keyword inputs), got int"),
    ("{dir}/mine.py:raising", "mine.py:raising raised ValueError: no weights here (at "),
    ("{dir}/mine.py:refused", "mine.py:refused: the model raised RuntimeError: "),
])
def test_the_users_function_that_cannot_be_used_is_named(tmp_path, capsys, spec, message):
    (tmp_path / "mine.py").write_text(_OWN_MODEL)
    assert main(["sites", spec.format(dir=tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_diff_of_a_model_whose_timestep_has_another_name(tmp_path, capsys):
    """The command line had no way to name the timestep argument (the Python API's
    ``timestep_arg=``), and the error listed the model's tensor inputs as "none"."""
    (tmp_path / "mine.py").write_text(_OWN_MODEL)
    spec, out = f"{tmp_path}/mine.py:renamed", str(tmp_path / "d.txt")
    assert main(["diff", spec, "--preset", "fora-2", "--format", "text", "-o", out]) == 2
    assert "inputs: hidden_states, t, class_labels)" in capsys.readouterr().err
    assert main(["diff", spec, "--preset", "fora-2", "--format", "text", "-o", out, "--timestep-arg", "t"]) == 0
    assert "inner.transformer_blocks.1" in open(out).read()


def test_a_failure_inside_ditopt_on_the_users_model_is_not_blamed_on_the_model(tmp_path, monkeypatch):
    """An error raised in ditopt's own code while it worked on the user's model was printed as
    "the model raised IndexError": the user was sent to debug a model that is fine. It is ours,
    and shown whole."""
    import sys

    import ditopt

    (tmp_path / "mine.py").write_text(_OWN_MODEL)
    parse_slice = sys.modules["ditopt.sites"].parse_slice  # raises ValueError in ditopt's own code
    monkeypatch.setattr(ditopt, "sites", lambda *args, **kwargs: parse_slice(""))
    with pytest.raises(ValueError, match="empty"):
        main(["sites", f"{tmp_path}/mine.py:build"])


def test_diff_writes_the_page_for_wan_with_fora(tmp_path, capsys):
    out = tmp_path / "wan.html"
    assert main(["diff", "wan", "--preset", "fora-2", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "WanTransformer3DModel, plan fora-2 (20 steps)" in printed
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and 'data-site="blocks.1.ffn"' in page


def test_diff_default_output_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["diff", "dit", "--preset", "fora-2-block", "--format", "dot"]) == 0
    assert (tmp_path / "ditopt-diff-dit.dot").read_text().startswith("digraph")
    assert "wrote ditopt-diff-dit.dot" in capsys.readouterr().out


def test_diff_text_of_a_plan_file_to_stdout(tmp_path, capsys):
    plan = tmp_path / "p.yaml"
    plan.write_text('version: 1\nsteps: 4\nrules:\n  - {sites: "*", kind: block, action: reuse_residual, steps: [1, 3]}\n')
    assert main(["diff", "dit", "--plan", str(plan), "--format", "text", "-o", "-"]) == 0
    out = capsys.readouterr().out
    assert "--- before passes" in out and "# ---- site transformer_blocks.0 (block) ----" in out
    assert re.search(r"^  transformer_blocks\.0 +CrCr$", out, re.M) and "plan p.yaml (4 steps)" in out


@pytest.mark.parametrize("argv, message", [
    (["diff", "nosuchmodel", "--preset", "fora-2"], "unknown model 'nosuchmodel'"),
    (["diff", "dit", "--plan", "/nonexistent/plan.yaml"], "plan file not found"),
    (["diff", "dit", "--preset", "fora-x"], "unknown preset 'fora-x'"),
    (["diff", "dit", "--preset", "fora-0"], "preset 'fora-0': interval must be an integer >= 1, got 0"),
    (["diff", "dit", "--preset", "fora-2", "-o", "/nonexistent/dir/page.html"],
     "argument -o/--output: cannot write /nonexistent/dir/page.html: directory /nonexistent/dir does not exist"),
    (["plan", "validate", "/nonexistent/plan.yaml", "--model", "nosuchmodel"], "plan file not found"),
])
def test_diff_errors_are_one_line(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse refuses a bad argument before the command runs
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert re.match(r"ditopt( diff)?: error:", err) and message in err and "\n" not in err


def test_diff_bad_plan_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nsteps: 4\nrules: [\n")
    assert main(["diff", "dit", "--plan", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ditopt: error:") and "malformed YAML" in err and "\n" not in err
    other = tmp_path / "other.yaml"
    other.write_text("version: 1\nsteps: 4\nrules:\n  - {sites: 'blocks.*', action: reuse, steps: [1]}\n")
    assert main(["diff", "dit", "--plan", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert "pattern 'blocks.*' matches no site" in err and "\n" not in err


def test_diff_needs_a_plan_or_a_preset():
    r = subprocess.run([sys.executable, "-m", "ditopt.cli", "diff", "dit"], capture_output=True, text=True)
    assert r.returncode == 2 and "one of the arguments --plan --preset is required" in r.stderr


def test_profile_writes_map_heatmap_and_plan(tmp_path, capsys):
    out = tmp_path / "m.yaml"
    plan = tmp_path / "p.yaml"
    assert main(["profile", "dit-digits", "--steps", "6", "-o", str(out), "--budget", "0.5", "--plan", str(plan)]) == 0
    assert out.is_file() and out.with_suffix(".safetensors").is_file() and out.with_suffix(".png").is_file()
    import ditopt

    assert ditopt.Plan.load(plan).steps == 6
    assert "profiled dit-digits: 6 steps" in capsys.readouterr().out


def test_profile_plans_for_another_step_count(tmp_path, capsys):
    plan = tmp_path / "p.yaml"
    assert main(["profile", "dit-digits", "--steps", "4", "-o", str(tmp_path / "m.yaml"), "--budget", "0.5",
                 "--plan", str(plan), "--plan-steps", "7"]) == 0
    import ditopt

    assert ditopt.Plan.load(plan).steps == 7
    assert "plan for 7 steps at 50% of block compute" in capsys.readouterr().out


def test_profile_tune_writes_the_measured_best_plan(tmp_path, capsys):
    plan = tmp_path / "p.yaml"
    assert main(["profile", "dit-digits", "--steps", "4", "-o", str(tmp_path / "m.yaml"), "--budget", "0.5",
                 "--plan", str(plan), "--tune"]) == 0
    import ditopt

    loaded = ditopt.Plan.load(plan)
    assert loaded.steps == 4 and loaded.name.startswith("tuned: ")
    assert "on the calibration run, best of" in capsys.readouterr().out


def test_profile_and_bench_errors_are_one_line(tmp_path, capsys):
    assert main(["profile", "dit", "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "profile needs a zoo model" in err and "\n" not in err
    assert main(["profile", "dit-digits", "--steps", "2", "--tune"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--tune needs --budget" in err and "\n" not in err
    assert main(["profile", "dit-digits", "--steps", "2", "--budget", "0.5", "--tune", "--plan-steps", "4"]) == 2
    assert "--plan-steps needs --budget, and not --tune" in capsys.readouterr().err
    assert main(["profile", "dit-digits", "--steps", "1", "--budget", "0.5", "-o", str(tmp_path / "m.yaml")]) == 2
    err = capsys.readouterr().err.strip()  # before any work: nothing profiled, nothing written
    assert "--budget 0.5 is below the least compute a plan of 1 steps can spend" in err and "\n" not in err
    assert not list(tmp_path.iterdir())
    assert main(["bench", "--model", "dit-digits", "--methods", "nope:x", "--seeds", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown bench method(s) nope:x" in err and "\n" not in err


@pytest.mark.parametrize("preset", ["taylorseer-3", "taylorseer-2-output", "teacache-0.1", "dbcache-0.1", "delta-dit", "pab"])
def test_diff_takes_every_published_preset_by_name(preset, tmp_path, capsys):
    out = tmp_path / "d.txt"
    assert main(["diff", "dit", "--preset", preset, "--format", "text", "-o", str(out)]) == 0
    assert out.stat().st_size > 0


def test_sites_imports_no_harness_nor_plotting():
    """`ditopt sites` loads the compiler only: no matplotlib, scikit-image, benchmark or graph diff."""
    code = ("import sys; from ditopt.cli import main; assert main(['sites', 'dit']) == 0; "
            "print('LOADED', sorted(m for m in ('matplotlib', 'skimage', 'ditopt.bench', 'ditopt.graphdiff') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "LOADED []" in r.stdout, r.stdout.splitlines()[-1]


def test_the_demo_table_shows_each_call_under_its_step_and_cfg_branch():
    """wan-digits runs CFG as two calls per step: its 20 steps were listed as 40 "steps"."""
    from ditopt.demo import DemoResult, format_table

    result = DemoResult({"blocks.0": ["compute", "compute", "reuse", "reuse"]}, 1.0, 0.5, 0.1,
                        [(0, 0), (0, 1), (1, 0), (1, 1)])
    rows = format_table(result).splitlines()
    assert "CFG branch" in rows[0]
    assert [row.split() for row in rows[2:6]] == [["0", "0", "0/1"], ["0", "1", "0/1"], ["1", "0", "1/1"], ["1", "1", "1/1"]]


def test_diff_resamples_a_plan_file_to_the_steps_asked(tmp_path, capsys):
    """--steps was ignored with --plan: the diff showed the plan at its own step count."""
    plan = tmp_path / "p.yaml"
    plan.write_text('version: 1\nsteps: 4\nrules:\n  - {sites: "*", kind: block, action: reuse_residual, steps: [1, 3]}\n')
    assert main(["diff", "dit", "--plan", str(plan), "--steps", "8", "--format", "text", "-o", "-"]) == 0
    assert "(8 steps)" in capsys.readouterr().out


def test_plan_validate_against_a_model_names_the_file(tmp_path, capsys):
    plan = tmp_path / "p.yaml"
    plan.write_text('version: 1\nsteps: 4\nrules:\n  - {sites: "nosuch.*", kind: block, action: reuse_residual, steps: [1]}\n')
    assert main(["plan", "validate", str(plan), "--model", "dit"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{plan}: line 4, rule 0, site 'nosuch.*': pattern 'nosuch.*' matches no site" in err and "\n" not in err
