"""Presets of the published methods, and the plan language they need.

The language: ``stack[...]`` positions, the ``attention:`` rule field, and ``when.on: input`` with
``rescale`` (TeaCache). The presets: each compiles against real small diffusers models, runs
eagerly on the trained zoo model ``dit-digits``, and decides what its paper promises; each has
its YAML under ``configs/presets/``, equal to the function's output.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import ditopt
from ditopt import Plan, PlanError, presets
from ditopt.bench import METHODS, psnr
from ditopt.passes import insert_indicators, insert_step_tracking
from ditopt.runtime import DecisionTable, Indicator, Runtime
from real_models import build, timesteps as real_timesteps
from synthetic import UPDATE_INDICATOR, make_stack, modulate, prepare, timesteps

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8


@pytest.fixture(scope="module")
def tables():
    out = {}
    for name in ("dit", "wan", "cogvideox"):
        model, kwargs = build(name)
        out[name] = ditopt.sites(model, **kwargs)
    return out


def plan_text(rules: str, steps: int = STEPS) -> str:
    return f"version: 1\nsteps: {steps}\nrules:\n{rules}"


# -- stack[...] positions -------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, want", [
    ("stack[0]", [0]),
    ("stack[-1]", [2]),
    ("stack[2:]", [2]),
    ("stack[:-1]", [0, 1]),
    ("stack[::2]", [0, 2]),
    (["*", "!stack[0]"], [1, 2]),
    (["stack[1:]", "!stack[-1]"], [1]),
])
def test_stack_positions_select_the_stacks_blocks_in_graph_order(tables, pattern, want):
    table = tables["dit"]
    assert table.stack_blocks() == [f"transformer_blocks.{i}" for i in range(3)]
    got = [s.name for s in table.match(pattern, kind="block")]
    assert got == [f"transformer_blocks.{i}" for i in want]


def test_a_stack_position_also_selects_the_sites_inside_its_blocks(tables):
    assert [s.name for s in tables["wan"].match("stack[1]")] == ["blocks.1", "blocks.1.attn1", "blocks.1.attn2",
                                                                 "blocks.1.ffn"]


def test_stack_positions_parse_round_trip_and_compile(tables):
    plan = Plan.from_yaml(plan_text('  - sites: ["stack[1:]", "!stack[-1]"]\n    kind: block\n'
                                    '    steps: "1::2"\n    action: reuse_residual\n'))
    assert Plan.from_yaml(plan.to_yaml()).to_dict() == plan.to_dict()
    compiled = plan.compile(tables["dit"])
    assert list(compiled.actions) == ["transformer_blocks.1"]


@pytest.mark.parametrize("sites, message", [
    ('"stack[a]"', "line 4, rule 0.*not a stack position: 'stack\\[a\\]'"),
    ('["*", "!stack[1:2:0]"]', "line 4, rule 0.*not a stack position"),
    ('"stack[]"', "line 4, rule 0.*empty stack position"),
])
def test_a_malformed_stack_position_names_its_line(sites, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_yaml(plan_text(f"  - sites: {sites}\n    action: reuse_residual\n    steps: [1]\n"))


def test_a_stack_position_past_the_last_block_names_the_pattern(tables):
    plan = Plan.from_yaml(plan_text('  - sites: "stack[5]"\n    action: reuse_residual\n    steps: [1]\n'))
    with pytest.raises(PlanError, match="line 4, rule 0, site 'stack\\[5\\]'.*none of the stack's 3 blocks"):
        plan.compile(tables["dit"])


def test_when_of_takes_a_stack_position(tables):
    plan = Plan.from_yaml(plan_text('  - sites: "stack[2:]"\n    kind: block\n    action: reuse_residual\n'
                                    '    when: {of: "stack[1]", below: 0.1}\n'))
    compiled = plan.compile(tables["dit"])
    assert compiled.when_rules == [("transformer_blocks.1", 0.1)]
    assert list(compiled.actions) == ["transformer_blocks.2"]


# -- attention: self | cross | joint --------------------------------------------------------------

def test_attention_field_narrows_to_one_attention_kind(tables):
    plan = Plan.from_yaml(plan_text('  - sites: "*"\n    kind: attention\n    attention: cross\n'
                                    '    steps: [1, 3]\n    action: reuse\n'))
    assert plan.rules[0].attention == "cross"
    assert Plan.from_yaml(plan.to_yaml()).to_dict() == plan.to_dict()
    assert list(plan.compile(tables["wan"]).actions) == ["blocks.0.attn2", "blocks.1.attn2"]
    # a model without cross attention leaves the rule without effect (PAB's per-kind ranges)
    assert plan.compile(tables["dit"]).actions == {}


@pytest.mark.parametrize("field, message", [
    ("attention: spatial", "line 6, rule 0, site '\\*': unknown attention kind 'spatial'"),
    ("kind: block\n    attention: self", "line 7, rule 0.*'attention' narrows attention sites, but the rule's "
                                           "kind is 'block'"),
])
def test_a_bad_attention_field_names_its_line(field, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_yaml(plan_text(f'  - sites: "*"\n    steps: [1]\n    {field}\n    action: reuse\n'))


# -- when: on input, rescale ----------------------------------------------------------------------

TEACACHE_RULE = ('  - sites: "stack[1:]"\n    kind: block\n    action: reuse_residual\n'
                 '    when: {of: "stack[0]", on: input, rescale: [2.0, 0.5, 0.0], below: 0.1}\n')


def test_when_on_input_and_rescale_parse_and_round_trip():
    plan = Plan.from_yaml(plan_text(TEACACHE_RULE))  # a bare `on:` is YAML 1.1's True: read as "on"
    when = plan.rules[0].when
    assert (when.on, when.rescale, when.below) == ("input", (2.0, 0.5, 0.0), 0.1)
    assert Plan.from_yaml(plan.to_yaml()).rules[0].when == when
    default = Plan.from_yaml(plan_text(TEACACHE_RULE.replace("on: input, rescale: [2.0, 0.5, 0.0], ", "")))
    assert (default.rules[0].when.on, default.rules[0].when.rescale) == ("output", None)
    assert "on" not in default.rules[0].when.to_dict() and "rescale" not in default.rules[0].when.to_dict()


@pytest.mark.parametrize("old, new, message", [
    ("on: input", "on: middle", "line 7, rule 0.*'when.on' must be one of \\['output', 'input'\\], got 'middle'"),
    ("rescale: [2.0, 0.5, 0.0]", "rescale: []", "line 7, rule 0.*'when.rescale' must be a non-empty list"),
    ("rescale: [2.0, 0.5, 0.0]", "rescale: [a]", "line 7, rule 0.*'when.rescale'"),
    ('of: "stack[0]"', 'of: "stack[x]"', "line 7, rule 0.*'when.of': not a stack position"),
    ("below: 0.1", "below: 0.1, after: 2", "line 7, rule 0.*'when' must be"),
])
def test_a_bad_when_names_its_line(old, new, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_yaml(plan_text(TEACACHE_RULE.replace(old, new)))


@pytest.mark.parametrize("model", ["dit", "wan", "cogvideox"])
def test_on_input_watches_the_modulated_input_of_the_first_attention(tables, model):
    """The watched node feeds the block's first attention, is computed inside the block (after
    its norm and modulation), and is shaped like the block's hidden states."""
    table = tables[model]
    compiled = presets.teacache(0.1, steps=STEPS).compile(table)
    block = table[table.stack_blocks()[0]]
    attention = next(s for s in table if s.kind == "attention" and s.parent == block.name)
    watched = compiled.indicators[0].node
    assert watched == block.modulated_input
    assert watched in attention.inputs and watched in block.nodes
    assert watched not in block.inputs  # not the block's own input: the modulated one
    assert compiled.when_rules == [(block.name, 0.1)]


def test_rescale_maps_each_change_through_the_polynomial_before_accumulating():
    rt = Runtime()
    graph = rt.add_graph(DecisionTable(steps=4, actions={}, adaptive={}, slots={},
                                       indicators=[Indicator("a", 1.0, node="a_out", rescale=(10.0, 0.0, 0.05))]))
    x = torch.ones(4)
    accumulated = []
    for step, value in enumerate((x, 1.1 * x, 1.2 * x)):
        rt.begin(1000.0 - step, graph)
        rt.update_indicator(graph, 0, value)
        accumulated.append(rt._accumulated[(graph, 0, 0)])
    change_1 = 10 * 0.1 ** 2 + 0.05  # rel L1 0.1 -> 10 x^2 + 0.05 = 0.15
    change_2 = 10 * (0.1 / 1.1) ** 2 + 0.05
    torch.testing.assert_close(accumulated[1], torch.tensor(change_1))
    torch.testing.assert_close(accumulated[2], torch.tensor(change_1 + change_2))


@torch.no_grad()
def hand_teacache(model, xs, ts, threshold, rescale):
    """TeaCache written out: block 0 runs; the relative L1 change of its modulated input
    (modulate(norm1(x)) before attention), mapped through ``rescale`` and summed since the last
    computing step, decides whether blocks 1.. reuse their residuals."""
    previous, accumulated, residuals, outs, reused = None, 0.0, {}, [], []
    for x, t in zip(xs, ts):
        temb = model.embed(t)
        first = model.blocks[0]
        shift, scale, _, _ = first.ada(torch.nn.functional.silu(temb)).chunk(4, -1)
        watched = modulate(first.norm1(x), shift, scale)
        reuse = False
        if previous is not None:
            change = ((watched - previous).abs().mean() / previous.abs().mean()).item()
            accumulated += sum(c * change ** (len(rescale) - 1 - i) for i, c in enumerate(rescale))
            reuse = accumulated < threshold
            accumulated = accumulated if reuse else 0.0
        previous = watched
        h = first(x, temb)
        for i, block in enumerate(model.blocks[1:], start=1):
            if reuse:
                h = h + residuals[i]
            else:
                out = block(h, temb)
                residuals[i], h = out - h, out
        reused.append(reuse)
        outs.append(model.head(h))
    return outs, reused


@pytest.mark.parametrize("threshold", [0.05, 0.3])
def test_teacache_on_a_hand_written_stack_matches_teacache_written_out(threshold):
    steps, rescale = 6, (4.0, 0.5, 0.0)
    model = make_stack(3)
    g = torch.Generator().manual_seed(1)
    base, drift = torch.randn(1, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    xs, ts = [base + 0.02 * i * drift for i in range(steps)], timesteps(steps)
    plan = presets.teacache(threshold, steps=steps + 1, rescale=list(rescale))  # last step never reached
    p = prepare(model, plan, [xs[0], ts[0]])
    p.run_up_to(insert_indicators)
    update = next(n for n in p.gm.graph.nodes if n.target is UPDATE_INDICATOR)
    assert update.args[1].name == p.sites["blocks.0"].modulated_input  # watches the input, not the output
    p.run_up_to()  # the rest of the pipeline (annotation and earlier passes are idempotent)
    expected, reused = hand_teacache(model, xs, ts, threshold, rescale)

    for x, t, want in zip(xs, ts, expected):
        torch.testing.assert_close(p(x, t)[0], want, rtol=0, atol=1e-5)
    assert p.runtime.decisions()["blocks.2"] == ["reuse_residual" if r else "compute" for r in reused]
    if threshold == 0.3:
        assert 0 < sum(reused) < steps - 1


# -- the presets against real models --------------------------------------------------------------

PRESETS = {
    "fora": lambda n: presets.fora(2, steps=n),
    "first-block-cache": lambda n: presets.first_block_cache(0.1, steps=n),
    "delta-dit": lambda n: presets.delta_dit(n, interval=2, k=1),
    "taylorseer": lambda n: presets.taylorseer(n, interval=2, order=1),
    "taylorseer-output": lambda n: presets.taylorseer(n, interval=2, order=1, level="output"),
    "teacache": lambda n: presets.teacache(0.1, steps=n),
    "dbcache": lambda n: presets.dbcache(0.1, n, fn=1, bn=0, warmup=1),
    "pab": lambda n: presets.pab(n, window=(1, n)),
}


@pytest.mark.parametrize("model", ["dit", "wan", "cogvideox"])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_compiles_against_real_models(tables, model, name):
    compiled = PRESETS[name](STEPS).compile(tables[model])
    assert compiled.actions, f"{name} does nothing on {model}"


def test_pab_gives_each_attention_kind_its_own_range(tables):
    plan = presets.pab(STEPS, self_range=2, cross_range=3, joint_range=4, window=(1, 7))
    wan = plan.compile(tables["wan"]).actions
    assert wan["blocks.0.attn1"] == ["compute", "compute", "reuse", "compute", "reuse", "compute", "reuse", "compute"]
    assert wan["blocks.0.attn2"] == ["compute", "compute", "reuse", "reuse", "compute", "reuse", "reuse", "compute"]
    cog = plan.compile(tables["cogvideox"]).actions
    assert cog["transformer_blocks.0.attn1"] == ["compute"] * 2 + ["reuse"] * 3 + ["compute", "reuse", "compute"]
    assert set(plan.compile(tables["dit"]).actions) == {f"transformer_blocks.{i}.attn1" for i in range(3)}


# -- the presets on the trained zoo model ---------------------------------------------------------

def run_on_digits(plan, steps=STEPS):
    """Decisions, output and full-compute reference of a short sampling run of dit-digits."""
    from ditopt import zoo

    zm = zoo.load("dit-digits")
    model = ditopt.optimize(zm.model, plan)
    out = zm.sample([3, 7], seed=0, steps=steps, transformer=model)
    reference = zm.sample([3, 7], seed=0, steps=steps)
    return ditopt.stats(model).decisions, out, reference


BLOCKS = [f"transformer_blocks.{i}" for i in range(6)]


def test_delta_dit_caches_rear_blocks_early_and_front_blocks_late():
    decisions, out, ref = run_on_digits(presets.delta_dit(STEPS, interval=2, k=2, boundary=4))
    r, c = "reuse_residual", "compute"
    for b in BLOCKS[-2:]:
        assert decisions[b] == [c, r, c, r, c, c, c, c]
    for b in BLOCKS[:2]:
        assert decisions[b] == [c, c, c, c, c, r, c, r]
    for b in BLOCKS[2:4]:
        assert decisions[b] == [c] * STEPS
    assert psnr(out, ref) > 20


def test_taylorseer_forecasts_every_block_between_full_steps():
    decisions, out, ref = run_on_digits(presets.taylorseer(STEPS, interval=3, order=2))
    for b in BLOCKS:
        assert decisions[b] == ["compute"] * 4 + ["predict"] * 2 + ["compute", "predict"]
    assert psnr(out, ref) > 15


def test_taylorseer_at_output_level_skips_the_whole_network_between_full_steps():
    decisions, out, ref = run_on_digits(presets.taylorseer(STEPS, interval=3, order=2, level="output"))
    assert decisions["output"] == ["compute"] * 4 + ["predict"] * 2 + ["compute", "predict"]
    assert all(decisions[b] == ["compute"] * 4 + ["skipped"] * 2 + ["compute", "skipped"] for b in BLOCKS)
    assert psnr(out, ref) > 15


def test_teacache_keeps_the_first_and_last_step_and_block_computing():
    decisions, out, ref = run_on_digits(presets.teacache(0.2, steps=STEPS))
    assert decisions[BLOCKS[0]] == ["compute"] * STEPS
    reused = [a == "reuse_residual" for a in decisions[BLOCKS[1]]]
    assert not reused[0] and not reused[-1] and any(reused)
    assert all(decisions[b] == decisions[BLOCKS[1]] for b in BLOCKS[1:])
    assert psnr(out, ref) > 15


def test_dbcache_front_and_back_blocks_always_compute():
    decisions, out, ref = run_on_digits(presets.dbcache(0.3, STEPS, fn=2, bn=1, warmup=2))
    for b in BLOCKS[:2] + BLOCKS[-1:]:
        assert decisions[b] == ["compute"] * STEPS
    middle = decisions[BLOCKS[2]]
    assert middle[:2] == ["compute"] * 2 and "reuse_residual" in middle
    assert all(decisions[b] == middle for b in BLOCKS[2:5])
    assert psnr(out, ref) > 15


def test_pab_broadcasts_attention_inside_its_window():
    decisions, out, ref = run_on_digits(presets.pab(STEPS, self_range=3, window=(2, 7)))
    for b in BLOCKS:
        assert decisions[f"{b}.attn1"] == ["compute"] * 3 + ["reuse"] * 2 + ["compute", "reuse", "compute"]
        assert decisions[b] == ["compute"] * STEPS and decisions[f"{b}.ff"] == ["compute"] * STEPS
    assert psnr(out, ref) > 15


# -- parameters -----------------------------------------------------------------------------------

def test_duca_alternates_token_wise_partial_and_stack_reuse_between_full_steps():
    plan = presets.duca(steps=12, interval=4, ratio=0.25)
    (partial, reuse) = plan.rules
    assert (partial.action, partial.kind, partial.ratio, partial.step_list(12)) == ("partial", "block", 0.25,
                                                                                   [2, 4, 6, 8, 10])
    assert (reuse.sites, reuse.action, reuse.step_list(12)) == (("stack",), "reuse", [3, 7, 11])
    with pytest.raises(ValueError, match="ratio must be a share"):
        presets.duca(steps=12, ratio=0)


@pytest.mark.parametrize("call, message", [
    (lambda: presets.delta_dit(10, interval=0), "interval must be an integer >= 1, got 0"),
    (lambda: presets.delta_dit(10, k=0), "k must be"),
    (lambda: presets.delta_dit(10, boundary=11), "boundary must be at most steps"),
    (lambda: presets.taylorseer(10, order=3), "order must be 0, 1 or 2, got 3"),
    (lambda: presets.taylorseer(10, interval=-1), "interval must be"),
    (lambda: presets.taylorseer(10, level="stack"), "level must be 'block' or 'output'"),
    (lambda: presets.taylorseer(0), "steps must be an integer in \\[1, 10000\\], got 0"),
    (lambda: presets.teacache(0, steps=10), "threshold must be > 0"),
    (lambda: presets.teacache(0.1, steps=10, rescale=[]), "rescale must be a non-empty list"),
    (lambda: presets.dbcache(0.1, 10, fn=0), "fn must be an integer >= 1, got 0"),
    (lambda: presets.dbcache(0.1, 10, bn=-1), "bn must be"),
    (lambda: presets.dbcache(0.1, 10, warmup=10), "warmup must be less than steps"),
    (lambda: presets.pab(10, cross_range=0), "cross_range must be an integer >= 1"),
    (lambda: presets.pab(10, window=(5, 2)), "window must be \\(start, stop\\)"),
])
def test_bad_parameters_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# -- configs/presets and the bench ------------------------------------------------------------------

def _write_presets():
    spec = importlib.util.spec_from_file_location("write_presets", ROOT / "tools" / "write_presets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_preset_files_equal_the_functions_and_load():
    files = _write_presets().preset_files()
    assert set(files) == {f"{name}.yaml" for name in presets.PRESETS}
    for name, text in files.items():
        path = ROOT / "configs" / "presets" / name
        assert path.read_text() == text, f"{path} is stale: run python tools/write_presets.py"
        plan = Plan.load(path)
        assert plan.steps == 20 and plan.to_yaml() == text


@pytest.mark.parametrize("key", ["ditopt:taylorseer", "ditopt:delta-dit", "ditopt:teacache", "ditopt:dbcache",
                                 "ditopt:pab"])
def test_each_preset_is_a_bench_method(key):
    settings = METHODS[key].settings(20)
    assert 1 <= len(settings) <= 4
    assert len({s.label for s in settings}) == len(settings)


@pytest.mark.slow
def test_teacache_under_inductor_decides_in_the_graph_like_eager():
    """`on: input` with `rescale` under inductor: fullgraph, no recompile, the decisions and
    outputs of the eager path."""
    model, kwargs = build("dit")
    plan = presets.teacache(0.2, steps=10, rescale=[1.0, 0.0])

    def run(m):
        with torch.no_grad():
            return [m(**{**kwargs, "timestep": t}, return_dict=False)[0]
                    for t in real_timesteps(10, kwargs["timestep"])]

    compiled = torch.compile(model, backend="ditopt", options={"plan": plan}, fullgraph=True, dynamic=False)
    outs = run(compiled)
    decisions = ditopt.stats(compiled).decisions
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    eager = ditopt.optimize(model, plan)
    for a, b in zip(outs, run(eager)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert ditopt.stats(eager).decisions == decisions
    assert "reuse_residual" in decisions["transformer_blocks.2"]


def test_ditfastattn_takes_a_window_per_axis_and_checks_it():
    plan = ditopt.presets.ditfastattn(steps=10, window=[2, 4, 4])
    assert plan.name == "ditfastattn-2x4x4" and ditopt.Plan.from_yaml(plan.to_yaml()) == plan
    assert [int(r.window) for r in plan.rules if r.action == "window"] == [32]
    with pytest.raises(ditopt.PlanError, match="window"):
        ditopt.presets.ditfastattn(steps=10, window=[2, 0, 4])
