"""The ``partial`` action (ToCa / DuCa token-wise caching): at a partial step a site recomputes the
``ceil(ratio * N)`` tokens whose input changed most since they were last computed (relative change
against the input cached at their last computation) and takes the others from its cached output.

The references share no code with the rewrite: :class:`HandPartial` hooks the eager model's module,
scores the tokens with its own arithmetic, and for a token-wise site (feed-forward) runs the module
on the picked tokens; for a block (self-attention inside) it takes the picked tokens of the block's
full output at this step (the rewrite's queries of the picked tokens attend to the keys and values of
every token, recomputed from this step's input: the same values) and scatters them into the cache.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import ditopt
from flop_counting import flops_per_call
from ditopt import PlanError
from ditopt.small_models import build, timesteps
from synthetic import eager, latents, make_stack
from synthetic import timesteps as stack_timesteps

STEPS = 4
PARTIAL_STEPS = [1, 2, 3]


def partial_plan(sites: str, ratio: float, steps=PARTIAL_STEPS, total: int = STEPS, **extra) -> ditopt.Plan:
    return ditopt.Plan.from_dict({"version": 1, "steps": total, "rules": [
        {"sites": sites, "steps": list(steps), "action": "partial", "ratio": ratio, **extra}]})


# -- the plan ---------------------------------------------------------------------------------------

def test_partial_rules_read_write_and_resample():
    plan = ditopt.Plan.from_yaml("""
version: 1
steps: 8
rules:
  - sites: "blocks.*"
    kind: block
    steps: "1:8"
    action: partial
    ratio: 0.25
""")
    assert plan.rules[0].ratio == 0.25
    assert ditopt.Plan.from_yaml(plan.to_yaml()) == plan
    assert plan.resample(16).rules[0].ratio == 0.25


@pytest.mark.parametrize("rule,message", [
    ({"action": "partial"}, "action partial needs 'ratio"),
    ({"action": "partial", "ratio": 0}, "'ratio' must be a share of the tokens"),
    ({"action": "partial", "ratio": 1.5}, "'ratio' must be a share of the tokens"),
    ({"action": "partial", "ratio": True}, "'ratio' must be a share of the tokens"),
    ({"action": "reuse", "ratio": 0.2}, "'ratio' applies to action partial, not 'reuse'"),
    ({"action": "partial", "ratio": 0.2, "when": {"of": "blocks.0", "below": 0.1}}, "'partial' cannot be adaptive"),
])
def test_malformed_partial_rules_are_named(rule, message):
    with pytest.raises(PlanError, match=message):
        ditopt.Plan.from_dict({"version": 1, "steps": 4, "rules": [{"sites": "*", "steps": [1], **rule}]})


@pytest.mark.parametrize("rules,message", [
    ([{"sites": "blocks.0.ff", "steps": [1], "action": "partial", "ratio": 0.2},
      {"sites": "blocks.0.ff", "steps": [2], "action": "partial", "ratio": 0.3}], "one partial ratio per plan"),
    ([{"sites": "blocks.0.ff", "steps": [1], "action": "partial", "ratio": 0.2},
      {"sites": "blocks.0.ff", "steps": [2], "action": "reuse"}], "a partial site takes no other reuse"),
    ([{"sites": "blocks.0.ff", "steps": [0], "action": "partial", "ratio": 0.2}], "partial at step 0"),
])
def test_partial_on_a_site_that_cannot_take_it_is_a_plan_error(rules, message):
    model = make_stack(2)
    sites = ditopt.sites(model, latents(1, seq=12)[0], stack_timesteps(1)[0])
    with pytest.raises(PlanError, match=message) as err:
        ditopt.Plan.from_dict({"version": 1, "steps": 4, "rules": rules}).compile(sites)
    assert err.value.site == "blocks.0.ff"


def test_a_site_that_mixes_tokens_otherwise_is_refused_naming_the_node():
    """The synthetic stack's attention runs SDPA on [batch, tokens, dim] (no heads): the token flow
    cannot follow it, and the refusal names the node."""
    model = make_stack(2)
    fast = ditopt.optimize(model, partial_plan("blocks.0", 0.5))
    x, t = latents(1, seq=12)[0], stack_timesteps(1)[0]
    with pytest.raises(PlanError, match=r"blocks\.0.*partial: the tokens cannot be followed.*scaled_dot_product"), \
            torch.no_grad():
        fast(x, t)


# -- the hand reference ------------------------------------------------------------------------------

class HandPartial:
    """Forward hooks on the eager model's modules ``names`` doing what ``partial`` means, by hand."""

    def __init__(self, model, names, ratio: float, partial_steps, token_wise: bool):
        self.ratio, self.partial_steps, self.token_wise = ratio, set(partial_steps), token_wise
        self.step, self.busy = 0, False
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hooks = [model.get_submodule(n).register_forward_hook(self.hook(n), with_kwargs=True) for n in names]

    def hook(self, name):
        def run(module, args, kwargs, out):
            if self.busy:  # the hook's own call of the module on the picked tokens
                return None
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            if self.step not in self.partial_steps or name not in self.cache:
                self.cache[name] = (x.clone(), y.clone())
                return None
            x_old, y_old = self.cache[name]
            k = math.ceil(self.ratio * x.shape[1] - 1e-9)
            y_new, x_new = y_old.clone(), x_old.clone()
            for b in range(x.shape[0]):  # each sample picks its own tokens
                change = [((x[b, i] - x_old[b, i]).norm() / x_old[b, i].norm()).item() for i in range(x.shape[1])]
                picked = sorted(sorted(range(len(change)), key=lambda i: -change[i])[:k])
                x_new[b, picked] = x[b, picked]
                if self.token_wise:
                    self.busy = True
                    try:
                        y_new[b, picked] = module(x[b:b + 1, picked])[0]
                    finally:
                        self.busy = False
                else:
                    y_new[b, picked] = y[b, picked]
            self.cache[name] = (x_new, y_new)
            return (y_new, *out[1:]) if isinstance(out, tuple) else y_new
        return run

    def remove(self):
        for h in self.hooks:
            h.remove()


def moving_latents(kwargs, steps: int) -> list[torch.Tensor]:
    """A latent that changes from step to step, token by token (as a sampler's does), seeded."""
    g = torch.Generator().manual_seed(7)
    x = kwargs["hidden_states"]
    return [x + 0.2 * i * torch.randn(x.shape, generator=g) for i in range(steps)]


def run_model(model, kwargs, ts, first: int = 0):
    """The model at timesteps ``ts`` (steps ``first``...), on a latent that moves per step."""
    outs = []
    latents_ = moving_latents(kwargs, first + len(ts))[first:]
    with torch.no_grad():
        for t, x in zip(ts, latents_):
            out = model(**{**kwargs, "timestep": t, "hidden_states": x})
            outs.append(out[0] if isinstance(out, tuple) else out.sample)
    return outs


def compare_with_hand(model, kwargs, pattern, kind, ratio, names, token_wise, ts=None):
    ts = ts or timesteps(STEPS, kwargs["timestep"])
    fast = ditopt.optimize(copy.deepcopy(model), partial_plan(pattern, ratio, **({"kind": kind} if kind else {})))
    got = run_model(fast, kwargs, ts)
    hand = HandPartial(model, names, ratio, PARTIAL_STEPS, token_wise)
    want = []
    try:
        for step, t in enumerate(ts):
            hand.step = step
            want += run_model(model, kwargs, [t], first=step)
    finally:
        hand.remove()
    plain = run_model(model, kwargs, ts)
    for step, (g, w, p) in enumerate(zip(got, want, plain)):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5, msg=f"step {step}")
    assert any((w - p).abs().max() > 1e-3 for w, p in zip(want, plain))  # partial really changed something
    return fast


def test_a_feed_forward_site_matches_the_hand_reference_on_the_synthetic_stack():
    model = make_stack(2)
    xs, ts = latents(1, seq=20)[0], stack_timesteps(STEPS)
    fast = ditopt.optimize(copy.deepcopy(model), partial_plan("blocks.0.ff", 0.3))
    plain = copy.deepcopy(model)
    hand = HandPartial(model, ["blocks.0.ff"], 0.3, PARTIAL_STEPS, token_wise=True)
    moving = [xs + 0.3 * i * torch.randn_like(xs) for i in range(STEPS)]  # an input that changes per token
    changed = []
    with torch.no_grad():
        for step, (x, t) in enumerate(zip(moving, ts)):
            got = fast(x, t)
            hand.step = step
            torch.testing.assert_close(got, eager(model, x, t)[0], atol=2e-5, rtol=2e-5, msg=f"step {step}")
            changed.append((got - eager(plain, x, t)[0]).abs().max().item())
    hand.remove()
    assert ditopt.stats(fast).decisions["blocks.0.ff"] == ["compute", "partial", "partial", "partial"]
    assert changed[0] == 0 and min(changed[1:]) > 1e-4  # partial steps are not all-compute


@pytest.mark.parametrize("name,pattern,kind,token_wise", [
    ("dit", "transformer_blocks.*", "feedforward", True),
    ("dit", "transformer_blocks.*", "block", False),
    ("pixart", "transformer_blocks.*", "block", False),
    ("wan", "blocks.*", "block", False),
])
def test_real_models_match_the_hand_reference(name, pattern, kind, token_wise):
    model, kwargs = build(name)
    sites = ditopt.sites(model, **kwargs)
    names = [s.name for s in sites if s.kind == kind and s.name.startswith(pattern[:-1])]
    fast = compare_with_hand(model, kwargs, pattern, kind, 0.25, names, token_wise)
    decisions = ditopt.stats(fast).decisions
    assert all(decisions[n] == ["compute", "partial", "partial", "partial"] for n in names)


@pytest.mark.parametrize("name,pattern", [("dit", "transformer_blocks.*"), ("pixart", "transformer_blocks.*"),
                                          ("wan", "blocks.*")])
def test_a_ratio_of_one_equals_all_compute(name, pattern):
    """Every token picked: the partial branch (gather, K/V of all, scatter) computes what the model does."""
    model, kwargs = build(name)
    ts = timesteps(STEPS, kwargs["timestep"])
    fast = ditopt.optimize(copy.deepcopy(model), partial_plan(pattern, 1.0, kind="block"))
    for got, want in zip(run_model(fast, kwargs, ts), run_model(model, kwargs, ts)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert "partial" in ditopt.stats(fast).decisions[pattern.replace("*", "0")]


def test_cross_attention_is_token_wise():
    """PixArt's cross-attention (keys and values from the text) recomputes its picked queries only."""
    model, kwargs = build("pixart")
    sites = ditopt.sites(model, **kwargs)
    names = [s.name for s in sites if s.kind == "attention" and s.attention == "cross"]
    compare_with_hand(model, kwargs, "transformer_blocks.*.attn2", None, 0.25, names, token_wise=False)


# -- FLOPs --------------------------------------------------------------------------------------------

def executed_flops(fast, kwargs, ts) -> list[int]:
    """FLOPs the rewritten graph module executes at each call (FlopCounterMode around it)."""
    with flops_per_call(fast._ditopt_backend.last.rewritten) as per_call:
        ditopt.reset(fast)
        run_model(fast, kwargs, ts)
    return per_call


def module_flops(model, kwargs) -> dict[str, int]:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**kwargs)
    root = type(model).__name__ + "."
    return {k.removeprefix(root): sum(v.values()) for k, v in counter.get_flop_counts().items()}


def partial_share(name, kind, ratio):
    """(executed FLOPs of the ``kind`` sites at a partial step / at a full step, their tokens)."""
    model, kwargs = build(name)
    sites = ditopt.sites(model, **kwargs)
    names = [s.name for s in sites if s.kind == kind]
    ref = module_flops(model, kwargs)
    site_flops = sum(ref[n] for n in names)
    ts = timesteps(STEPS, kwargs["timestep"])
    fast = ditopt.optimize(copy.deepcopy(model), partial_plan("*", ratio, kind=kind))
    run_model(fast, kwargs, ts)
    calls = executed_flops(fast, kwargs, ts)
    full, partial = calls[0], calls[1]
    assert full == ref["Global"]  # the full step executes what the model does
    assert calls[1:] == [partial] * (STEPS - 1)
    return (site_flops - (full - partial)) / site_flops


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_a_partial_feed_forward_executes_the_ratio_of_its_flops(ratio):
    share = partial_share("dit", "feedforward", ratio)  # DiT's 16 tokens: k = 4 or 8 exactly
    assert abs(share - ratio) <= 0.1 * ratio, share


def test_a_partial_block_executes_fewer_flops_and_says_how_many():
    """Blocks with self-attention: the picked queries attend to K/V of every token, recomputed
    (2 projections on all N tokens) -- the share is above the ratio by about those projections."""
    share = partial_share("dit", "block", 0.25)
    print(f"dit block partial ratio 0.25: executes {share:.3f} of the block FLOPs")
    assert 0.25 < share < 0.6


def test_the_cost_model_counts_a_partial_step_at_the_ratio_of_the_site():
    model, kwargs = build("dit")
    cost = ditopt.cost.cost_model(model, **kwargs)
    ff = [s.name for s in cost.sites if s.kind == "feedforward"]
    plan = partial_plan("*", 0.25, kind="feedforward")
    full = sum(cost.flops(b) for b in cost.block_sites())
    saved = sum(cost.flops(s) for s in ff) * 0.75 * len(PARTIAL_STEPS)
    assert cost.predict(plan).compute_fraction == pytest.approx(1 - saved / (STEPS * full))
    measured = partial_share("dit", "feedforward", 0.25)  # the executed share of the ff FLOPs
    assert measured == pytest.approx(0.25, rel=0.1)


def test_the_duca_preset_runs_and_skips_what_it_says():
    model, kwargs = build("dit")
    plan = ditopt.presets.duca(steps=8, interval=4, ratio=0.25)
    fast = ditopt.optimize(copy.deepcopy(model), plan)
    ts = timesteps(8, kwargs["timestep"])
    outs, want = run_model(fast, kwargs, ts), run_model(model, kwargs, ts)
    decisions = ditopt.stats(fast).decisions
    assert decisions["stack"] == ["compute"] * 3 + ["reuse"] + ["compute"] * 3 + ["reuse"]
    assert decisions["transformer_blocks.0"] == ["compute", "compute", "partial", "skipped", "partial", "compute",
                                                 "partial", "skipped"]
    torch.testing.assert_close(outs[1], want[1])  # full steps compute exactly
    assert all(torch.isfinite(o).all() for o in outs)
    predicted = ditopt.cost.cost_model(model, **kwargs).predict(plan).compute_fraction
    assert predicted == pytest.approx((3 + 3 * 0.25) / 8)  # computes 0, 1, 5; partial 2, 4, 6; reuse 3, 7


@pytest.mark.slow
def test_under_torch_compile_partial_blocks_equal_the_eager_path():
    """Inductor compiles the cond (topk, gather, scatter inside its branch) of each partial DiT block."""
    model, kwargs = build("dit")
    plan = partial_plan("*", 0.25, kind="block")
    eager_path = ditopt.optimize(copy.deepcopy(model), plan)
    compiled = torch.compile(copy.deepcopy(model), backend="ditopt", options={"plan": plan})
    ts = timesteps(STEPS, kwargs["timestep"])
    for a, b in zip(run_model(eager_path, kwargs, ts), run_model(compiled, kwargs, ts)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert ditopt.stats(compiled).decisions["transformer_blocks.0"] == ["compute", "partial", "partial", "partial"]


def test_partial_with_another_attention_backend_says_it_cannot_be_combined():
    """The refusal called flex attention "an op the token-flow check does not know ... only
    self-attention may mix tokens": it is self-attention, under another kernel."""
    model, kwargs = build("dit")
    plan = ditopt.Plan.from_dict({"version": 1, "steps": 4, "rules": [
        {"sites": "*", "kind": "block", "steps": [1, 3], "action": "partial", "ratio": 0.5}]})
    fast = ditopt.optimize(model, plan, attention_backend="flex")
    with pytest.raises(PlanError, match="partial follows tokens through SDPA self-attention only, and cannot be "
                                        "combined with attention_backend='flex'"), torch.no_grad():
        fast(**kwargs)
