"""Inputs validated at the door (issue 17, item 5): every bad plan, redundancy map, number or
command-line argument raises one clear one-line error naming what is at fault, before any work
starts and without touching the model or the files; good inputs still pass."""

import os
import re
import time
from pathlib import Path

import pytest
import torch
import yaml

import ditopt
from ditopt.backend import as_plan
from ditopt.cli import main
from ditopt.errors import MAX_STEPS, DitoptError, InputError, PlanError
from ditopt.plan import Plan, Rule, When
from ditopt.planner import PlannerConfig, smoothcache
from ditopt.profile import ProfileError, RedundancyMap, signature
from ditopt.resample import resample_map, resample_plan
from ditopt.runtime.observe import METRICS
from ditopt.tune import candidate_plans, spread_schedules
from ditopt.validate import MAX_TEXT_BYTES

PLAN = "version: 1\nsteps: {steps}\nrules:\n  - {{sites: '*', kind: block, action: reuse_residual, steps: {rule}}}\n"
WHEN = "version: 1\nsteps: 4\nrules:\n  - {{sites: '*', action: reuse, when: {when}}}\n"


def plan_text(steps="10", rule="'1:10:2'"):
    return PLAN.format(steps=steps, rule=rule)


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and len(text) < 400, text
    return text


# -- plans ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    (plan_text(steps="10000000"), r"'steps' must be an integer in \[1, 10000\], got 10000000"),
    (plan_text(steps="1000000000000"), r"'steps' must be an integer in \[1, 10000\]"),
    (plan_text(steps="0"), r"'steps' must be an integer in \[1, 10000\], got 0"),
    (plan_text(steps="2.5"), r"'steps' must be an integer"),
    (plan_text(steps="'10'"), r"'steps' must be an integer"),
    (plan_text(steps="true"), r"'steps' must be an integer"),
    (plan_text(rule="'1:10:0'"), r"line 4, rule 0, site '\*': 'steps': not a slice: '1:10:0' \(step 0\)"),
    (plan_text(rule="'a:b'"), r"line 4, rule 0.*'steps': not a slice"),
    (plan_text(rule="[]"), r"line 4, rule 0.*'steps' is an empty list"),
    (plan_text(rule="[1, 2.5]"), r"line 4, rule 0.*'steps' must be a slice string .* or a list"),
    (plan_text(rule="[1, true]"), r"'steps' must be a slice string"),
    (plan_text(rule="[1, 10]"), r"line 4, rule 0.*step 10 is out of range 0..9"),
    (plan_text(rule="[-1]"), r"step -1 is out of range"),
    (plan_text(rule="{a: 1}"), r"'steps' must be a slice string"),
    (WHEN.format(when="{of: x, below: .nan}"), r"line 4, rule 0, site '\*': 'when.below' must be a finite number > 0, got nan"),
    (WHEN.format(when="{of: x, below: .inf}"), r"'when.below' must be a finite number > 0, got inf"),
    (WHEN.format(when="{of: x, below: -.inf}"), r"'when.below' must be a finite number > 0, got -inf"),
    (WHEN.format(when="{of: x, below: -0.1}"), r"'when.below' must be a finite number > 0, got -0.1"),
    (WHEN.format(when="{of: x, below: 0}"), r"'when.below' must be a finite number > 0, got 0"),
    (WHEN.format(when="{of: x, below: '0.1'}"), r"'when.below' must be a finite number > 0, got '0.1'"),
    (WHEN.format(when="{of: x, below: 0.1, rescale: [1, .nan]}"), r"'when.rescale' coefficient 1 must be a finite number, got nan"),
    (WHEN.format(when="{of: x, below: 0.1, rescale: []}"), r"'when.rescale' must be a non-empty list of at most 16"),
    (WHEN.format(when="{of: [x], below: 0.1}"), r"'when.of' must name a site"),
    (WHEN.format(when="{of: '', below: 0.1}"), r"'when.of' must name a site"),
    (WHEN.format(when="{of: x, below: 0.1, on: 3}"), r"'when.on' must be one of"),
    ("version: 1\nsteps: 4\nrules:\n  - {sites: '*', action: predict, order: 3, steps: [1]}\n", r"'order' must be one of"),
    ("version: 1\nsteps: 4\nrules:\n  - {sites: '*', action: predict, order: 1.0, steps: [1]}\n", r"'order' must be one of"),
    ("version: 1\nsteps: 4\nrules:\n  - {sites: [], action: reuse, steps: [1]}\n", r"'sites' must be a glob or a non-empty"),
    ("version: 1\nsteps: 4\nrules:\n  - {sites: '', action: reuse, steps: [1]}\n", r"'sites': a glob must be a non-empty"),
    ("version: 1\nsteps: 4\nrules:\n  - {sites: '*', action: [reuse], steps: [1]}\n", r"unknown action \['reuse'\]"),
    ("version: 1\nsteps: 4\nrules:\n  - {sites: '*', kind: 5, action: reuse, steps: [1]}\n", r"unknown kind 5"),
    ("version: 1\nsteps: 4\nname: [a, b]\nrules: []\n", r"'name' must be a string"),
    ("version: 1\nsteps: 4\nmodel: 5\nrules: []\n", r"'model' must be a string"),
    ("version: 1\nsteps: 4\nname: " + "n" * 2000 + "\nrules: []\n", r"'name' must be a string of at most 1000"),
    ("version: true\nsteps: 4\nrules: []\n", r"unknown plan version True"),
    ("version: 1\nsteps: 4\nrules: {a: 1}\n", r"'rules' must be a list of rules"),
    ("version: 1\nsteps: 4\n1: x\nrules: []\n", r"unknown plan field\(s\) \[1\]"),
    ("[[[[" * 40 + "]]]]" * 40, r"YAML nested more than 64 deep"),
    ("a: &a [*a]\n", r"line 1: recursive YAML alias"),
    ("a: [1\n", r"malformed YAML"),
])
def test_bad_plan_text_is_refused_naming_the_field(text, message):
    with pytest.raises(PlanError, match=message) as info:
        Plan.from_yaml(text)
    one_line(info.value)


def _bomb(where: str) -> str:
    """A billion-laughs YAML: 9**9 nodes once expanded, ``where`` holding the last alias."""
    anchors = "x0: &x0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 9)}]\n" for i in range(1, 9))
    return anchors + where


@pytest.mark.parametrize("where", [
    "name: *x8\nversion: 1\nsteps: 4\nrules: []\n",
    "model: *x8\nversion: 1\nsteps: 4\nrules: []\n",
    "version: 1\nsteps: 4\nrules:\n  - {sites: *x8, action: reuse, steps: [1]}\n",
    "version: 1\nsteps: 4\nrules:\n  - {sites: '*', action: reuse, when: {of: *x8, below: 0.1}}\n",
    "version: 1\nsteps: 4\nrules: []\ndescription: *x8\n",
])
def test_an_alias_bomb_is_refused_at_once(where):
    start = time.perf_counter()
    with pytest.raises(PlanError, match=r"YAML aliases expand to more than 100000 nodes") as info:
        Plan.from_yaml(_bomb(where))
    assert time.perf_counter() - start < 0.5
    one_line(info.value)


def test_plan_text_is_bounded_in_size(tmp_path):
    text = plan_text() + "# " + "x" * MAX_TEXT_BYTES + "\n"
    with pytest.raises(PlanError, match=r"bytes of YAML, more than the 1000000 ditopt reads"):
        Plan.from_yaml(text)
    path = tmp_path / "huge.yaml"
    path.write_text(text)
    with pytest.raises(PlanError, match=r"huge.yaml: \d+ bytes of YAML"):
        Plan.load(path)


@pytest.mark.parametrize("plan, message", [
    (Plan(steps=10**9, rules=[]), r"'steps' must be an integer in \[1, 10000\], got 1000000000"),
    (Plan(steps=4, rules=[Rule(sites=("*",), action="reuse", steps="1:4:0")]), r"rule 0.*not a slice: '1:4:0' \(step 0\)"),
    (Plan(steps=4, rules=[Rule(sites=("*",), action="reuse", steps=())]), r"rule 0.*'steps' is an empty list"),
    (Plan(steps=4, rules=[Rule(sites=("*",), action="reuse", when=When(of="x", below=float("nan")))]),
     r"rule 0.*'when.below' must be a finite number > 0, got nan"),
    (Plan(steps=4, rules=[Rule(sites="blocks.*", action="reuse", steps=(1,))]), r"Rule.sites must be a tuple"),
    (Plan(steps=4, rules=["not a rule"]), r"rule 0: a rule must be a Rule, got str"),
    (Plan(steps=4, rules=[], name=["x"]), r"'name' must be a string"),
])
def test_a_plan_built_in_python_is_checked_like_yaml(plan, message):
    with pytest.raises(PlanError, match=message):
        as_plan(plan)


def test_plan_arguments_say_what_is_wrong_with_the_path(tmp_path):
    (tmp_path / "plans").mkdir()
    (tmp_path / "plan.txt").write_text(plan_text())
    model = torch.nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [(tmp_path / "plans", "plan path is a directory, not a plan file"), (str(tmp_path / "plans"), "directory"),
             (tmp_path / "missing.yaml", "plan file not found"), (str(tmp_path / "missing.yml"), "plan file not found"),
             (str(tmp_path / "missing"), "plan file not found"), (tmp_path / "plan.txt", "must end in .yaml or .yml"),
             ("", "empty plan text"), (3.5, "expected a Plan, a plan file path, YAML text or a dict, got float")]
    for arg, message in cases:
        with pytest.raises(PlanError, match=message) as info:
            ditopt.optimize(model, arg)
        assert "a plan must be a mapping" not in str(info.value)
        if isinstance(arg, (str, Path)) and arg:
            assert str(arg) in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.txt", "plans"]


def test_a_preset_name_given_as_a_plan_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file of that name here
    model = torch.nn.Linear(2, 2)
    for spelled, call in (("fora", "ditopt.presets.fora(steps=N)"), ("fora-3", "fora(steps=N, interval=3)"),
                          ("fbcache-0.08", "first_block_cache(steps=N, threshold=0.08)")):
        with pytest.raises(PlanError, match=re.escape(call)):
            ditopt.optimize(model, spelled)
    with pytest.raises(PlanError, match="plan file not found: forra$"):
        ditopt.optimize(model, "forra")


def test_an_optimised_model_is_not_optimised_again():
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                  num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    fast = ditopt.optimize(model, ditopt.presets.fora(steps=4))
    with pytest.raises(DitoptError, match=r"not one it optimised already; .*ditopt.set_plan"):
        ditopt.optimize(fast, ditopt.presets.fora(steps=4))


def test_good_plans_still_pass(tmp_path):
    for suffix in (".yaml", ".yml", ".YAML"):
        path = tmp_path / f"p{suffix}"
        path.write_text(plan_text())
        assert as_plan(path).steps == 10 and as_plan(str(path)).rules[0].step_list(10) == [1, 3, 5, 7, 9]
    assert as_plan("{version: 1, steps: 4, rules: []}").steps == 4
    assert as_plan(yaml.safe_load(plan_text(steps=MAX_STEPS, rule="'1:'"))).steps == MAX_STEPS
    text = ("version: 1\nsteps: 4\nrules:\n  - {sites: 'a', action: reuse, when: &w {of: 'stack[0]', below: 0.1, "
            "rescale: [1.5, -0.2, 0.01]}}\n  - {sites: 'b', action: reuse, when: *w}\n")
    plan = Plan.from_yaml(text)  # a plain alias is fine
    assert plan.rules[1].when == When(of="stack[0]", below=0.1, rescale=(1.5, -0.2, 0.01))
    for preset in ("fora", "teacache"):
        plan = getattr(ditopt.presets, preset)(**({"interval": 2} if preset == "fora" else {"threshold": 0.1}), steps=20)
        assert as_plan(plan) is plan and Plan.from_yaml(plan.to_yaml()) == plan


# -- redundancy maps --------------------------------------------------------------------------------
SITES = ["output", "blocks.0", "blocks.0.attn1", "blocks.1"]
KINDS = ["output", "block", "attention", "block"]


def small_map(steps=4, branches=1) -> RedundancyMap:
    return RedundancyMap(
        model="M", signature=signature("M", SITES, KINDS), steps=steps, branches=branches, sites=list(SITES),
        kinds=list(KINDS), parents={"output": None, "blocks.0": "stack", "blocks.0.attn1": "blocks.0",
                                    "blocks.1": "stack"},
        residual_form={s: k == "block" for s, k in zip(SITES, KINDS)}, flops={s: 1e6 for s in SITES},
        seconds={s: 0.01 for s in SITES}, timesteps=[1000.0 - 1000.0 * i / steps for i in range(steps)],
        metrics={m: torch.rand(steps, len(SITES), branches) for m in METRICS},
        samples={s: torch.rand(steps, branches, 8) for s in SITES}, stack=["blocks.0", "blocks.1"])


@pytest.fixture
def saved(tmp_path):
    return small_map().save(tmp_path / "map.yaml")


def _edit_yaml(path, edit):
    meta = yaml.safe_load(path.read_text())
    edit(meta)
    path.write_text(yaml.safe_dump(meta, sort_keys=False))


def _resign(meta):
    meta["signature"] = signature(meta["model"], [s["name"] for s in meta["sites"]], [s["kind"] for s in meta["sites"]])


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("steps"), r"map.yaml: missing key 'steps'"),
    (lambda m: m.pop("tensors"), r"map.yaml: missing key 'tensors'"),
    (lambda m: m["sites"][2].pop("kind"), r"map.yaml: sites\[2\]: missing key 'kind'"),
    (lambda m: m["sites"].pop(1), r"map.yaml: its site list does not match its signature"),
    (lambda m: m["sites"].reverse(), r"map.yaml: its site list does not match its signature"),
    (lambda m: (m["sites"].pop(2), _resign(m)), r"tensor 'samples/blocks.0.attn1' names no metric or site"),
    (lambda m: (m["sites"].pop(1), _resign(m)), r"'stack' names 'blocks.0', which is not in its site list"),
    (lambda m: m.update(steps=5), r"'timesteps' must be a list of 5 numbers"),
    (lambda m: m.update(steps=5, timesteps=[1.0] * 5), r"metric 'rel_l1' must be a float tensor of shape \(5, 4, 1\)"),
    (lambda m: m.update(steps=10**7), r"'steps' must be an integer in \[1, 10000\]"),
    (lambda m: m.update(branches=2), r"metric 'rel_l1' must be a float tensor of shape \(4, 4, 2\)"),
    (lambda m: m.update(branches=0), r"'branches' must be an integer in \[1, 64\]"),
    (lambda m: m.update(tensors="../elsewhere.safetensors"), r"'tensors' must be a file name beside the map"),
    (lambda m: m.update(tensors="gone.safetensors"), r"its tensors file gone.safetensors is missing"),
    (lambda m: m["sites"][0].update(flops_per_call=float("nan")), r"sites\[0\].flops_per_call must be a finite number"),
    (lambda m: m["sites"][1].update(residual="yes"), r"sites\[1\].residual must be true or false"),
    (lambda m: m["sites"][1].update(kind="blob"), r"sites\[1\].kind must be one of"),
    (lambda m: m.update(model=["M"]), r"'model' must be a string"),
    (lambda m: m.update(format=2), r"not a ditopt redundancy map"),
])
def test_a_bad_map_yaml_is_refused_naming_the_key(saved, edit, message):
    _edit_yaml(saved, edit)
    with pytest.raises(ProfileError, match=message) as info:
        RedundancyMap.load(saved)
    one_line(info.value)


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b[:-1], lambda b: b"", lambda b: b"\xff" * 64,
                                    lambda b: b[:8] + b"#" * 12 + b[20:]])
def test_truncated_or_corrupt_tensors_are_refused_naming_the_file(saved, damage):
    tensors = saved.with_suffix(".safetensors")
    tensors.write_bytes(damage(tensors.read_bytes()))
    with pytest.raises(ProfileError, match=r"map.safetensors: cannot read the map's tensors") as info:
        RedundancyMap.load(saved)
    one_line(info.value)


def test_tensors_that_disagree_with_the_site_list_are_refused(tmp_path):
    rmap = small_map()
    rmap.samples["blocks.9"] = torch.rand(4, 1, 8)
    with pytest.raises(ProfileError, match=r"tensor 'samples/blocks.9' names no metric or site"):
        RedundancyMap.load(rmap.save(tmp_path / "extra.yaml"))
    rmap = small_map()
    del rmap.samples["blocks.1"]
    with pytest.raises(ProfileError, match=r"samples of site 'blocks.1' must be \[steps=4, branches=1, keep\]"):
        RedundancyMap.load(rmap.save(tmp_path / "missing.yaml"))
    rmap = small_map()
    rmap.metrics["cos"] = rmap.metrics["cos"][:, :3]
    with pytest.raises(ProfileError, match=r"metric 'cos' must be a float tensor of shape \(4, 4, 1\)"):
        RedundancyMap.load(rmap.save(tmp_path / "short.yaml"))


def test_map_yaml_is_bounded_like_plans(saved):
    saved.write_text(_bomb("format: 1\nmodel: *x8\n"))
    start = time.perf_counter()
    with pytest.raises(ProfileError, match=r"map.yaml: YAML aliases expand to more than 100000 nodes"):
        RedundancyMap.load(saved)
    assert time.perf_counter() - start < 0.5
    with pytest.raises(ProfileError, match=r"redundancy map not found: .*nope.yaml"):
        RedundancyMap.load(saved.with_name("nope.yaml"))


def test_a_good_map_round_trips(saved):
    back = RedundancyMap.load(saved)
    assert back.sites == SITES and back.steps == 4 and back.stack == ["blocks.0", "blocks.1"]
    assert back.metric("rel_l1").shape == (4, 4, 1) and back.residual_form["blocks.0"] is True
    assert resample_map(back, 6).steps == 6
    assert ditopt.plan_from_profile(back, budget=0.5).steps == 4


def test_unwritable_map_path_is_a_profile_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ProfileError, match=r"cannot write redundancy map .*file/map.safetensors"):
        small_map().save(tmp_path / "file" / "map.yaml")


# -- numbers given to the planner, the resampler, the tuner and the profiler ------------------------
@pytest.mark.parametrize("call, error, message", [
    (lambda: resample_plan(Plan.from_yaml(plan_text()), 10**7), PlanError, r"resample to must be an integer in \[1, 10000\]"),
    (lambda: resample_plan("plan.yaml", 10), PlanError, r"resample_plan needs a Plan, got str"),
    (lambda: resample_map(small_map(), 10**7), ProfileError, r"resample a map to must be an integer in \[2, 10000\]"),
    (lambda: resample_map(small_map(steps=1), 4), ProfileError, r"a map of 1 step\(s\) has no schedule"),
    (lambda: PlannerConfig(budget=float("nan")), ProfileError, r"budget must be a fraction of full compute in \(0, 1\], got nan"),
    (lambda: PlannerConfig(budget=True), ProfileError, r"budget must be a fraction .* got True"),
    (lambda: PlannerConfig(max_error=float("inf")), ProfileError, r"max_error must be a finite number >= 0, got inf"),
    (lambda: PlannerConfig(accumulation=float("nan")), ProfileError, r"accumulation must be a finite number >= 0"),
    (lambda: PlannerConfig(steps=10**7), ProfileError, r"steps must be an integer in \[2, 10000\]"),
    (lambda: PlannerConfig(warmup=1.5), ProfileError, r"warmup must be an integer in \[1, 10000\]"),
    (lambda: PlannerConfig(max_consecutive=10**9), ProfileError, r"max_consecutive must be an integer in \[0, 10000\]"),
    (lambda: PlannerConfig(orders=(3,)), ProfileError, r"orders must be a non-empty subset of \(0, 1, 2\)"),
    (lambda: PlannerConfig(methods=("freq",)), ProfileError, r"methods must be a non-empty subset"),
    (lambda: PlannerConfig(orders=()), ProfileError, r"orders must be a non-empty subset"),
    (lambda: PlannerConfig(sites=("a", 3)), ProfileError, r"sites must be a non-empty list of site names"),
    (lambda: ditopt.plan_from_profile(small_map(), budget=float("inf")), ProfileError, r"budget must be a fraction"),
    (lambda: smoothcache(small_map(), float("nan")), ProfileError, r"alpha must be a finite number > 0, got nan"),
    (lambda: smoothcache(small_map(), 0.1, max_consecutive=-1), ProfileError, r"max_consecutive must be an integer"),
    (lambda: smoothcache(small_map(), 0.1, metric="nope"), ProfileError, r"unknown metric 'nope'"),
    (lambda: candidate_plans(small_map(), float("nan")), ProfileError, r"budget must be a fraction .* got nan"),
    (lambda: candidate_plans(small_map(), None), ProfileError, r"tune needs budget="),
    (lambda: spread_schedules(10**7, 5), ProfileError, r"steps must be an integer in \[1, 10000\]"),
    (lambda: spread_schedules(10, 11), ProfileError, r"computed must be an integer in \[0, 10\]"),
    (lambda: ditopt.tune(torch.nn.Linear(2, 2), print, small_map(), budget=0.0), ProfileError, r"budget must be a fraction"),
    (lambda: ditopt.profile(torch.nn.Linear(2, 2), print, steps=0), ProfileError, r"steps must be an integer in \[1, 10000\], got 0"),
    (lambda: ditopt.profile(torch.nn.Linear(2, 2), print, steps=10**7), ProfileError, r"steps must be an integer in \[1, 10000\]"),
    (lambda: ditopt.profile(torch.nn.Linear(2, 2), print, steps=4, keep=0), ProfileError, r"keep must be an integer"),
    (lambda: ditopt.profile(torch.nn.Linear(2, 2), None, steps=4), ProfileError, r"run must be a function"),
])
def test_numbers_from_users_are_bounded(call, error, message):
    with pytest.raises(error, match=message) as info:
        call()
    one_line(info.value)


# -- the command line -------------------------------------------------------------------------------
def run_cli(argv, capsys) -> tuple[int, str]:
    """``main(argv)``'s exit status (returned, or raised by argparse) and its stderr."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("")
    return path


@pytest.mark.parametrize("argv, message", [
    (["profile", "dit-digits", "--steps", "0"], r"argument --steps: must be an integer in [1, 10000], got '0'"),
    (["profile", "dit-digits", "--steps", "-3"], r"argument --steps: must be an integer in [1, 10000], got '-3'"),
    (["profile", "dit-digits", "--steps", "99999999"], r"argument --steps: must be an integer"),
    (["profile", "dit-digits", "--steps", "2.5"], r"argument --steps: must be an integer"),
    (["profile", "dit-digits", "--threads", "0"], r"argument --threads: must be an integer in [1, 1024], got '0'"),
    (["profile", "dit-digits", "--seed", "-1"], r"argument --seed: must be an integer"),
    (["profile", "dit-digits", "--budget", "0"], r"argument --budget: must be a fraction of full compute in (0, 1]"),
    (["profile", "dit-digits", "--budget", "1.5"], r"argument --budget: must be a fraction"),
    (["profile", "dit-digits", "--budget", "nan"], r"argument --budget: must be a fraction"),
    (["profile", "dit-digits", "--budget", "0.5", "--plan-steps", "1"],
     "argument --plan-steps: must be an integer in [2, 10000]"),
    (["profile", "dit-digits", "-o", "{tmp}/no/such/dir/m.yaml"],
     "argument -o/--output: cannot write {tmp}/no/such/dir/m.yaml: directory {tmp}/no/such/dir does not exist"),
    (["profile", "dit-digits", "-o", "{file}/m.yaml"],
     "argument -o/--output: cannot write {file}/m.yaml: {file} is not a directory"),
    (["profile", "dit-digits", "-o", "{tmp}"], r"argument -o/--output: {tmp} is a directory"),
    (["profile", "dit-digits", "--png", "{file}/h.png"], r"argument --png: cannot write"),
    (["profile", "dit-digits", "--budget", "0.5", "--plan", "{file}/p.yaml"], r"argument --plan: cannot write"),
    (["demo", "--interval", "0"], r"argument --interval: must be an integer in [1, 10000], got '0'"),
    (["demo", "--steps", "0"], r"argument --steps: must be an integer in [1, 10000], got '0'"),
    (["demo", "--repeats", "0"], r"argument --repeats: must be an integer in [1, 1000], got '0'"),
    (["demo", "--layers", "-2"], r"argument --layers: must be an integer"),
    (["demo", "--hidden", "0"], r"argument --hidden: must be an integer in [4, 8192]"),
    (["diff", "dit", "--preset", "fora-2", "--steps", "0"], r"argument --steps: must be an integer in [1, 10000]"),
    (["diff", "dit", "--preset", "fora-2", "-o", "{file}/page.html"], r"argument -o/--output: cannot write"),
])
def test_bad_arguments_exit_non_zero_before_any_work(argv, message, capsys, tmp_path, a_file):
    argv = [a.format(tmp=tmp_path, file=a_file) for a in argv]
    before = sorted(tmp_path.iterdir())
    code, err = run_cli(argv, capsys)
    assert code not in (0, None)
    assert message.format(tmp=tmp_path, file=a_file) in err
    assert "\n" not in err and "Traceback" not in err
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("argv, message", [
    (["demo", "--model", "random-dit", "--hidden", "130"], "hidden must be a multiple of 4"),
    (["profile", "dit-digits", "--tune"], "--tune needs --budget"),
    (["profile", "dit-digits", "--plan", "p.yaml"], "--plan needs --budget"),
    (["profile", "dit-digits", "--plan-steps", "8"], "--plan-steps needs --budget"),
    (["plan", "validate", "."], "plan path is a directory, not a plan file: ."),
    (["plan", "validate", "plan.txt"], "plan file must end in .yaml or .yml: plan.txt"),
])
def test_checks_that_need_more_than_one_argument_exit_non_zero_before_work(argv, message, capsys, tmp_path,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plan.txt").write_text(plan_text())
    start = time.perf_counter()
    code, err = run_cli(argv, capsys)
    assert code not in (0, None) and err.startswith("ditopt: error:") and message in err and "\n" not in err
    assert time.perf_counter() - start < 5  # nothing was built, profiled or timed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.txt"]


def test_default_outputs_in_an_unwritable_directory_are_refused_first(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p).resolve() == tmp_path.resolve()
                        else real_access(p, mode))
    for argv, name in ((["profile", "dit-digits"], "dit-digits-map.yaml"),
                       (["diff", "dit", "--preset", "fora-2"], "ditopt-diff-dit.html")):
        code, err = run_cli(argv, capsys)
        assert code == 2 and err == f"ditopt: error: cannot write {name}: permission denied"
    code, err = run_cli(["profile", "dit-digits", "-o", str(tmp_path / "m.yaml")], capsys)
    assert code == 2 and "argument -o/--output: cannot write" in err and "permission denied" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through file permissions")
def test_a_read_only_directory_is_refused(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, err = run_cli(["profile", "dit-digits", "-o", str(ro / "m.yaml")], capsys)
    finally:
        ro.chmod(0o755)
    assert code == 2 and "permission denied" in err


def test_good_arguments_still_parse(tmp_path, capsys):
    from ditopt.cli import count, fraction, output_path

    assert count(1, MAX_STEPS)("20") == 20 and fraction("0.5") == 0.5 and fraction("1") == 1.0
    assert output_path("-") == "-" and output_path(str(tmp_path / "new.yaml")) == str(tmp_path / "new.yaml")
    plan = tmp_path / "p.yml"
    plan.write_text(plan_text())
    assert main(["plan", "validate", str(plan)]) == 0
    assert "valid: 1 rules for 10 steps" in capsys.readouterr().out
    out = tmp_path / "dot.dot"
    assert main(["diff", "dit", "--preset", "fora-2", "--steps", "4", "--format", "dot", "-o", str(out)]) == 0
    assert out.read_text().startswith("digraph")


def test_library_errors_are_ditopt_errors():
    for error in (PlanError, ProfileError, InputError):
        assert issubclass(error, DitoptError)
    with pytest.raises(InputError, match="repeats must be an integer in \\[1, 1000\\], got 0"):
        from ditopt.demo import run_demo

        run_demo(repeats=0)


def test_a_key_written_twice_is_refused_naming_both_lines():
    text = ('version: 1\nsteps: 4\nrules:\n  - sites: "*"\n    kind: block\n    action: reuse_residual\n'
            '    steps: [1]\n    steps: [2, 3]\n')
    with pytest.raises(PlanError, match=r"line 8: key 'steps' written twice in one mapping \(first at line 7\)"):
        Plan.from_yaml(text)
    anchors = 'version: 1\nsteps: 4\nrules:\n  - &r {sites: "*", kind: block, action: reuse, steps: [1]}\n  - *r\n'
    assert len(Plan.from_yaml(anchors).rules) == 2  # an alias repeats a mapping, not a key


def test_wrong_kinds_of_argument_are_named():
    with pytest.raises(PlanError, match="expected a plan file path, got NoneType"):
        Plan.load(None)
    with pytest.raises(DitoptError, match="got NoneType"):
        ditopt.stats(None)
    model = ditopt.small_models.dit()[0]
    with pytest.raises(DitoptError, match="is not an optimised model"):
        ditopt.step_callback(model)  # the original: refused when made, not in the middle of a pipeline
    fast = ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=4))
    with pytest.raises(InputError, match="steps must be an integer >= 1.*'20'"):
        ditopt.step_callback(fast, steps="20")


def test_map_and_heatmap_paths_are_what_is_written_or_refused(tmp_path):
    rmap = small_map()
    (tmp_path / "keep.yaml").write_text("someone's file")
    with pytest.raises(ProfileError, match=r"written as \.yaml .*got keep\.json"):
        rmap.save(tmp_path / "keep.json")  # was written to keep.yaml, over that file
    assert (tmp_path / "keep.yaml").read_text() == "someone's file"
    with pytest.raises(ProfileError, match="a directory"):
        rmap.save(tmp_path)
    assert rmap.save(tmp_path / "m") == tmp_path / "m.yaml"
    assert rmap.heatmap(tmp_path / "heat").is_file()  # the path written: heat.png
    with pytest.raises(ProfileError, match="unknown metric 'nope'"):
        rmap.heatmap(tmp_path / "h.png", metric="nope")
    with pytest.raises(ProfileError, match="directory .* does not exist"):
        rmap.heatmap(tmp_path / "missing" / "h.png")


def test_planner_inputs_of_the_wrong_kind_are_named():
    rmap = small_map()
    with pytest.raises(ProfileError, match="comm_budget plans from a K/V change map"):
        ditopt.plan_from_profile(rmap, comm_budget=0.5)
    assert PlannerConfig(sites="blocks.0").sites == ("blocks.0",)  # one site, not its letters
    with pytest.raises(ProfileError, match="site 'stack' is not in this map"):
        ditopt.plan_from_profile(rmap, budget=0.5, sites=["stack"])


def test_profile_outputs_that_would_overwrite_each_other_are_refused_before_work(tmp_path, capsys):
    out = str(tmp_path / "m.yaml")
    assert main(["profile", "dit-digits", "--steps", "4", "-o", out, "--budget", "0.5", "--plan", out]) == 2
    assert "two outputs would be written to" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_a_plan_made_for_another_class_is_refused_on_every_path():
    from ditopt.graphdiff import graph_diff
    from ditopt.small_models import MODELS

    pixart, pixart_inputs = MODELS["pixart"]()
    plan = Plan.from_dict({"version": 1, "steps": 4, "model": "WanTransformer3DModel",
                           "rules": [{"sites": "*", "kind": "block", "steps": [1, 3], "action": "reuse_residual"}]})
    compiled = torch.compile(pixart, backend="ditopt", options={"plan": plan, "inductor": False}, fullgraph=True)
    with pytest.raises(Exception, match="plan was made for WanTransformer3DModel, not PixArtTransformer2DModel"), \
            torch.no_grad():
        compiled(**pixart_inputs)
    with pytest.raises(PlanError, match="plan was made for WanTransformer3DModel"):
        graph_diff(pixart, plan, **pixart_inputs)


def test_inspection_calls_name_a_wrong_kind_of_argument():
    with pytest.raises(DitoptError, match="got NoneType"):
        ditopt.compiled_graph(None)
    with pytest.raises(DitoptError, match="takes a torch.nn.Module, got Tensor"):
        ditopt.mark_repeated_blocks(torch.zeros(1))


def test_a_plan_whose_rules_reach_no_site_they_apply_to_says_so():
    """A window rule for self-attention on a model with joint attention only (SD3): every rule
    resolved to nothing, and the model ran as the bare one with no word."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8).eval()
    fast = ditopt.optimize(model, ditopt.presets.ditfastattn(steps=4, window=4, warmup=1, interval=4))
    with pytest.warns(RuntimeWarning, match="plan 'ditfastattn-4' decides nothing but compute on this model.*"
                                            "joint attention"):
        with torch.no_grad():
            fast(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 6, 32),
                 pooled_projections=torch.randn(1, 16), timestep=torch.tensor([999.0]))
