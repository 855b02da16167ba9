"""The ``share_cfg`` action: the unconditional CFG branch takes the conditional branch's output plus
the offset (uncond - cond) cached at the last step both computed, at attention sites and blocks.

Batched CFG (one call on ``[uncond; cond]``): the site computes the conditional half only
(``passes/insert_cfg_sharing.py``), eagerly and under inductor. CFG as two calls (cond first): the unconditional call's site
returns the cond call's output of the step plus the offset (``runtime/cfg_sharing.py``).

The references share no code with ditopt: they replace the modules' forwards in the eager model
(:func:`hand_batched`, :func:`hand_calls`).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode

import ditopt
from flop_counting import flops_per_call
from ditopt import PlanError
from ditopt.small_models import build, timesteps as model_timesteps

STEPS = 4
SHARED = (1, 2)
# the sites a plan addresses per model: HunyuanVideo's text refiner repeats its mask over the batch
# for the heads (refused below), so its plans name the stack's blocks
SITES = {"dit": "*", "pixart": "*", "wan": "*", "hunyuan": ["transformer_blocks.*", "single_transformer_blocks.*"]}


def share_plan(kind: str, sites="*", steps=SHARED, cfg=None) -> ditopt.Plan:
    rule = {"sites": sites, "kind": kind, "steps": list(steps), "action": "share_cfg"}
    if cfg is not None:
        rule["cfg"] = cfg
    return ditopt.Plan.from_dict({"version": 1, "steps": STEPS, "rules": [rule]})


def cfg_batch(name: str):
    """The model and a batched-CFG call's inputs: [uncond; cond], the two halves conditioned apart."""
    model, kwargs = build(name)
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 1:
            other = torch.zeros_like(v) if k == "encoder_hidden_states" else v
            v = torch.cat([other, v]) if k != "hidden_states" else torch.cat([v, v])
        elif k == "encoder_hidden_states":  # PixArt: a batch of two already; the uncond half has null text
            v = torch.cat([torch.zeros_like(v[:1]), v[1:]])
        elif k == "class_labels":
            v = torch.tensor([0, 3])
        out[k] = v
    return model, out


def site_modules(model, sites, kind):
    names = [s.name for s in sites if s.kind == kind]
    return {n: model.get_submodule(n) for n in names}


def halves(value, index: int, batch: int = 2):
    half = batch // 2
    return tree_map(lambda v: v.narrow(0, index * half, half)
                    if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch else v, value)


class Patched:
    """Replace each module's forward while the context is open."""

    def __init__(self, forwards):
        self.forwards = forwards

    def __enter__(self):
        for m, f in self.forwards.items():
            m.forward = f

    def __exit__(self, *exc):
        for m in self.forwards:
            del m.forward


def hand_batched(modules, step: int, offsets: dict):
    """Batched CFG by hand, unconditional half first: at a shared step each module runs on the
    conditional half and returns [cond + offset; cond]; elsewhere it runs and keeps the offset."""
    def make(name, m):
        real = type(m).forward

        def forward(*args, **kwargs):
            if step in SHARED:
                flat, spec = tree_flatten(real(m, *halves(args, 1), **halves(kwargs, 1)))
                return tree_unflatten([torch.cat([o + d, o]) for o, d in zip(flat, offsets[name])], spec)
            out = real(m, *args, **kwargs)
            offsets[name] = [o[:1] - o[1:] for o in tree_flatten(out)[0]]
            return out
        return forward
    return Patched({m: make(n, m) for n, m in modules.items()})


def hand_calls(modules, step: int, call: int, kept: dict):
    """CFG as two calls by hand: the cond call (0) runs and keeps its outputs; the uncond call (1)
    returns them plus the offset of the last step it ran, at shared steps."""
    def make(name, m):
        real = type(m).forward

        def forward(*args, **kwargs):
            if call == 1 and step in SHARED:
                flat, spec = tree_flatten(kept[name, "cond"])
                return tree_unflatten([o + d for o, d in zip(flat, kept[name, "offset"])], spec)
            out = real(m, *args, **kwargs)
            if call == 0:
                kept[name, "cond"] = out
            else:
                kept[name, "offset"] = [u - c for u, c in zip(tree_flatten(out)[0], tree_flatten(kept[name, "cond"])[0])]
            return out
        return forward
    return Patched({m: make(n, m) for n, m in modules.items()})


# -- the plan --------------------------------------------------------------------------------------------

def test_share_cfg_rules_read_write_and_resample():
    plan = ditopt.Plan.from_yaml("""
version: 1
steps: 8
rules:
  - sites: "*"
    kind: attention
    steps: "2:8:2"
    action: share_cfg
    cfg: {layout: calls}
""")
    assert plan.rules[0].cfg.to_dict() == {"layout": "calls", "uncond": "second"}  # diffusers: cond call first
    assert ditopt.Plan.from_yaml(plan.to_yaml()) == plan
    assert plan.resample(16).rules[0].cfg == plan.rules[0].cfg
    default = share_plan("block").rules[0]
    assert default.cfg is None and "cfg" not in default.to_dict()


@pytest.mark.parametrize("rule,message", [
    ({"action": "reuse", "cfg": "batched"}, "'cfg' applies to action share_cfg, not 'reuse'"),
    ({"action": "share_cfg", "cfg": {"layout": "split"}}, "cfg layout must be one of"),
    ({"action": "share_cfg", "cfg": {"layout": "calls", "uncond": "first"}}, "conditional call must come first"),
    ({"action": "share_cfg", "cfg": {"order": 1}}, "'cfg' must be"),
    ({"action": "share_cfg", "when": {"of": "blocks.0", "below": 0.1}}, "'share_cfg' cannot be adaptive"),
])
def test_malformed_share_cfg_rules_are_named(rule, message):
    with pytest.raises(PlanError, match=message):
        ditopt.Plan.from_dict({"version": 1, "steps": 4, "rules": [{"sites": "*", "steps": [1], **rule}]})


def test_share_cfg_at_step_zero_is_refused():
    with pytest.raises(PlanError, match="share_cfg at step 0"):
        share_plan("block", steps=(0, 1))


@pytest.fixture(scope="module")
def dit_sites():
    model, kwargs = cfg_batch("dit")
    return ditopt.sites(model, **kwargs)


@pytest.mark.parametrize("rules,message", [
    ([{"sites": "transformer_blocks.0.ff", "steps": [1], "action": "share_cfg"}],
     "share_cfg applies to attention and block sites; 'transformer_blocks.0.ff' is a feedforward"),
    ([{"sites": "transformer_blocks.0", "kind": "block", "steps": [1], "action": "share_cfg"},
      {"sites": "transformer_blocks.0", "kind": "block", "steps": [2], "action": "reuse"}],
     "a share_cfg site takes no other reuse"),
    ([{"sites": "transformer_blocks.0", "kind": "block", "steps": [1], "action": "share_cfg"},
      {"sites": "transformer_blocks.1", "kind": "block", "steps": [1], "action": "share_cfg", "cfg": "calls"}],
     "disagree on the CFG layout"),
])
def test_share_cfg_misuse_is_a_plan_error_naming_the_site(dit_sites, rules, message):
    plan = ditopt.Plan.from_dict({"version": 1, "steps": 4, "rules": rules})
    with pytest.raises(PlanError, match=message):
        plan.compile(dit_sites)


def test_the_table_reports_the_layout_and_the_shared_sites(dit_sites):
    table = share_plan("block").compile(dit_sites)
    assert (table.cfg.layout, table.cfg.cond_half) == ("batched", 1)
    assert table.cfg_shared() == ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"]
    assert share_plan("block", cfg="calls").compile(dit_sites).cfg_shared() == []
    # with batched CFG a share_cfg block runs (on half the batch): the sites inside it are not skipped
    assert table.static_decisions([0, 1], ["transformer_blocks.0", "transformer_blocks.0.attn1"]) == {
        "transformer_blocks.0": ["compute", "share_cfg"], "transformer_blocks.0.attn1": ["compute", "compute"]}
    calls = share_plan("block", cfg="calls").compile(dit_sites)
    # CFG as two calls: the conditional call (first) computes, the unconditional one skips the block
    assert calls.static_decisions([1, 1], ["transformer_blocks.0", "transformer_blocks.0.attn1"]) == {
        "transformer_blocks.0": ["compute", "share_cfg"], "transformer_blocks.0.attn1": ["compute", "skipped"]}


# -- batched CFG on the small models ----------------------------------------------------------------------

def run_batched(name: str, kind: str):
    model, kwargs = cfg_batch(name)
    fast = ditopt.optimize(model, share_plan(kind, sites=SITES[name]))
    modules = site_modules(model, ditopt.sites(model, **kwargs).match(SITES[name] if isinstance(SITES[name], list)
                                                                      else [SITES[name]]), kind)
    offsets, pairs = {}, []
    with torch.no_grad():
        for step, t in enumerate(model_timesteps(STEPS, kwargs["timestep"])):
            inputs = {**kwargs, "timestep": t}
            out = fast(**inputs, return_dict=False)[0]
            with hand_batched(modules, step, offsets):
                ref = model(**inputs, return_dict=False)[0]
            pairs.append((out, ref, model(**inputs, return_dict=False)[0]))
    return fast, modules, pairs


@pytest.mark.parametrize("name", ["dit", "pixart", "wan", "hunyuan"])
@pytest.mark.parametrize("kind", ["attention", "block"])
def test_batched_cfg_equals_the_hand_written_sharing(name, kind):
    fast, modules, pairs = run_batched(name, kind)
    for step, (out, ref, full) in enumerate(pairs):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        if step in SHARED:  # it is not the full computation
            assert (out - full).abs().max() > 1e-5
        else:
            torch.testing.assert_close(out, full, atol=1e-6, rtol=1e-6)
    decisions = ditopt.stats(fast).decisions
    for site in modules:
        assert decisions[site] == ["compute", "share_cfg", "share_cfg", "compute"]


def test_hunyuan_text_refiner_is_refused_naming_the_site():
    """The refiner's attention repeats its mask over the batch for the heads (``repeat_interleave``):
    the batch is merged into another dimension there, so it cannot be halved."""
    model, kwargs = cfg_batch("hunyuan")
    fast = ditopt.optimize(model, share_plan("attention", sites="context_embedder.*"))
    with pytest.raises(PlanError, match=r"refiner_blocks\.0\.attn.*batch") as err, torch.no_grad():
        fast(**kwargs)
    assert err.value.site.startswith("context_embedder.token_refiner.refiner_blocks.0")


def test_a_batch_of_one_under_batched_cfg_is_refused():
    model, kwargs = build("wan")
    fast = ditopt.optimize(model, share_plan("block"))
    with pytest.raises(PlanError, match=r"blocks\.0.*even batch.*layout: calls"), torch.no_grad():
        fast(**kwargs)


def executed_flops_per_call(opt, kwargs) -> list[int]:
    """FLOPs the rewritten graph module executes at each call of a generation (as test_cost does)."""
    with flops_per_call(ditopt.compiled_graph(opt).rewritten) as per_call:
        ditopt.reset(opt)
        with torch.no_grad():
            for t in model_timesteps(STEPS, kwargs["timestep"]):
                opt(**{**kwargs, "timestep": t})
    return per_call


@pytest.mark.parametrize("kind", ["attention", "block"])
def test_a_shared_step_executes_half_the_sites_flops_as_predicted(kind):
    model, kwargs = cfg_batch("dit")
    fast = ditopt.optimize(model, share_plan(kind))
    with torch.no_grad():
        fast(**kwargs)
    calls = executed_flops_per_call(fast, kwargs)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**kwargs)
    root = type(model).__name__ + "."
    flops = {k.removeprefix(root): sum(v.values()) for k, v in counter.get_flop_counts().items()}
    sites = list(site_modules(model, ditopt.sites(model, **kwargs), kind))
    whole, shared = flops["Global"], sum(flops[s] for s in sites)
    assert shared > 0 and shared % 2 == 0
    print(f"dit share_cfg at {kind} sites: FLOPs per call {calls}")  # docs/BENCHMARKS.md quotes these
    assert calls == [whole, whole - shared // 2, whole - shared // 2, whole]
    blocks = sum(flops[s] for s in site_modules(model, ditopt.sites(model, **kwargs), "block"))
    predicted = ditopt.cost_model(model, **kwargs).predict(share_plan(kind))  # DecisionTable.static_decisions
    assert predicted.block_flops == STEPS * blocks - len(SHARED) * shared // 2


# -- CFG as two calls ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["wan", "hunyuan"])
@pytest.mark.parametrize("kind", ["attention", "block"])
def test_two_call_cfg_equals_the_hand_written_sharing(name, kind):
    model, kwargs = build(name)
    uncond = {**kwargs, "encoder_hidden_states": torch.zeros_like(kwargs["encoder_hidden_states"])}
    fast = ditopt.optimize(model, share_plan(kind, sites=SITES[name], cfg={"layout": "calls"}))
    found = ditopt.sites(model, **kwargs)
    modules = site_modules(model, found.match(SITES[name] if isinstance(SITES[name], list) else [SITES[name]]), kind)
    kept = {}
    with torch.no_grad():
        for step, t in enumerate(model_timesteps(STEPS, kwargs["timestep"])):
            for call, inputs in enumerate((kwargs, uncond)):
                inputs = {**inputs, "timestep": t}
                out = fast(**inputs, return_dict=False)[0]
                full = model(**inputs, return_dict=False)[0]
                with hand_calls(modules, step, call, kept):
                    ref = model(**inputs, return_dict=False)[0]
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
                if call == 0 or step not in SHARED:  # the cond call is unchanged
                    torch.testing.assert_close(out, full, atol=1e-6, rtol=1e-6)
                else:
                    assert (out - full).abs().max() > 1e-5
    decisions = ditopt.stats(fast).decisions
    for site in modules:
        assert decisions[site] == ["compute", "compute", "compute", "share_cfg", "compute", "share_cfg",
                                   "compute", "compute"]


def test_set_plan_swaps_share_cfg_steps_and_refuses_another_layout():
    model, kwargs = cfg_batch("dit")
    fast = ditopt.optimize(model, share_plan("block"))
    with torch.no_grad():
        fast(**kwargs)
    ditopt.set_plan(fast, share_plan("block", steps=(1, 3)))
    with torch.no_grad():
        for t in model_timesteps(STEPS, kwargs["timestep"]):
            fast(**{**kwargs, "timestep": t})
    assert ditopt.stats(fast).decisions["transformer_blocks.0"] == ["compute", "share_cfg", "compute", "share_cfg"]
    with pytest.raises(PlanError, match="CFG"):
        ditopt.set_plan(fast, share_plan("block", cfg={"layout": "batched", "uncond": "second"}))


@pytest.mark.slow
def test_share_cfg_compiles_under_inductor_like_eager():
    """Batched CFG on DiT's blocks, and CFG as two calls on Wan's: the compiled model decides and
    computes as ditopt.optimize does."""
    dit, dit_inputs = cfg_batch("dit")
    wan, wan_inputs = build("wan")
    uncond = {**wan_inputs, "encoder_hidden_states": torch.zeros_like(wan_inputs["encoder_hidden_states"])}
    for model, calls, plan, site in [(dit, [dit_inputs], share_plan("block"), "transformer_blocks.0"),
                                     (wan, [wan_inputs, uncond], share_plan("block", cfg="calls"), "blocks.0")]:
        compiled = torch.compile(model, backend="ditopt", options={"plan": plan}, fullgraph=True, dynamic=False)
        fast = ditopt.optimize(model, plan)
        with torch.no_grad():
            for t in model_timesteps(STEPS, calls[0]["timestep"]):
                for inputs in calls:
                    inputs = {**inputs, "timestep": t}
                    torch.testing.assert_close(compiled(**inputs, return_dict=False)[0],
                                               fast(**inputs, return_dict=False)[0], atol=1e-4, rtol=1e-4)
        assert ditopt.stats(compiled).decisions == ditopt.stats(fast).decisions
        assert ditopt.stats(compiled).decisions[site][2 * len(calls) - 1] == "share_cfg"  # step 1 (its uncond call)


@pytest.mark.parametrize("layout, calls_per_step", [("calls", 1), ("batched", 2)])
def test_calls_that_do_not_fit_the_layout_are_warned_of(layout, calls_per_step):
    """A plan for two calls per step under a caller making one (or the other way round) shared
    nothing, silently: every share_cfg step computed."""
    model, kwargs = build("dit")
    fast = ditopt.optimize(model, share_plan("block", cfg={"layout": layout}))
    outs = []
    with pytest.warns(RuntimeWarning, match=f"share_cfg is planned for CFG {layout}, but the caller made"), \
            torch.no_grad():
        for t in model_timesteps(STEPS, kwargs["timestep"]):
            for _ in range(calls_per_step):
                outs.append(fast(**{**kwargs, "timestep": t}).sample)
                full = model(**{**kwargs, "timestep": t}).sample
                torch.testing.assert_close(outs[-1], full, atol=1e-6, rtol=1e-6)  # nothing shared, as it says
