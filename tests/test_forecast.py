"""The ``predict`` forecasters (``method: taylor | hermite | foca | freq``): each exact on what it
is built for, the plan field, and a hermite plan on a small diffusers DiT."""

import math

import numpy as np
import pytest
import torch

import ditopt
from ditopt import Plan, PlanError
from ditopt.plan import Rule
from ditopt.runtime import forecast as fc
from ditopt.runtime.decisions import Action
from ditopt.runtime.session import taylor_forecast as taylor_from_session
from real_models import build

torch.manual_seed(0)
A, B, C = (torch.randn(3, 5, dtype=torch.float64) for _ in range(3))  # a tensor-valued polynomial's coefficients


def poly(coeffs, s):
    return sum(c * float(s) ** k for k, c in enumerate(coeffs))


def samples(coeffs, steps):
    return [poly(coeffs, s) for s in steps]


# -- taylor -------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps, at", [([4], 9), ([3, 5], 8), ([2, 3, 5], 7), ([1, 4, 6], 10)])
def test_taylor_exact_on_polynomials_of_its_order(steps, at):
    coeffs = [A, B, C][:len(steps)]
    assert torch.allclose(fc.taylor_forecast(steps, samples(coeffs, steps), at), poly(coeffs, at))
    assert taylor_from_session is fc.taylor_forecast  # moved, still importable from the session


def test_taylor_coefficients_are_the_interpolants_derivatives_at_the_newest_step():
    steps = [1, 4, 6]
    got = fc.taylor_coefficients(steps, samples([A, B, C], steps))
    # p(6 + x) = A + B (6 + x) + C (6 + x)^2
    want = [A + 6 * B + 36 * C, B + 12 * C, C]
    assert all(torch.allclose(g, w) for g, w in zip(got, want))


# -- hermite ------------------------------------------------------------------------------------

def _hermite_image(coeffs_at_newest, x, scale):
    """sum c_k s^k H_k(s x), H the physicists' Hermite polynomials, evaluated with numpy."""
    out = 0
    for k, c in enumerate(coeffs_at_newest):
        basis = np.zeros(k + 1)
        basis[k] = 1.0
        out = out + c * scale ** k * float(np.polynomial.hermite.hermval(scale * x, basis))
    return out


@pytest.mark.parametrize("scale", [fc.HERMITE_SCALE, 0.5, 0.75])
@pytest.mark.parametrize("steps, at", [([3, 5], 8), ([2, 3, 5], 7), ([1, 4, 6], 10)])
def test_hermite_is_the_scaled_hermite_image_of_the_interpolant(steps, at, scale):
    coeffs = [A, B, C][:len(steps)]
    at_newest = fc.taylor_coefficients(steps, samples(coeffs, steps))
    want = _hermite_image(at_newest, at - steps[-1], scale)
    assert torch.allclose(fc.hermite_forecast(steps, samples(coeffs, steps), at, scale=scale), want)


def test_hermite_at_unit_scale_is_exact_on_lines_and_drops_the_curvature_term_of_parabolas():
    assert fc.HERMITE_SCALE == pytest.approx(1 / math.sqrt(2))  # the documented default: He_k(x)
    s = 1 / math.sqrt(2)
    steps = [3, 5]
    assert torch.allclose(fc.hermite_forecast(steps, samples([A, B], steps), 9, scale=s), poly([A, B], 9))
    steps = [2, 3, 5]  # He_2(x) = x^2 - 1: the parabola at `at`, less its x^2 coefficient
    got = fc.hermite_forecast(steps, samples([A, B, C], steps), 8, scale=s)
    assert torch.allclose(got, poly([A, B, C], 8) - C)


def test_hermite_contracts_the_step_by_two_s_squared():
    steps = [3, 5]  # order 1: c0 + c1 * (2 s^2) x
    got = fc.hermite_forecast(steps, samples([A, B], steps), 9, scale=0.5)
    assert torch.allclose(got, poly([A, B], 5 + 0.5 * 4))


# -- foca ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps, at", [([3, 5], 8), ([2, 3, 5], 7), ([1, 4, 6], 12)])
def test_foca_exact_on_lines(steps, at):
    assert torch.allclose(fc.foca_forecast(steps, samples([A, B], steps), at), poly([A, B], at))


@pytest.mark.parametrize("steps, at", [([2, 3, 5], 7), ([1, 4, 6], 12), ([0, 1, 2], 3)])
def test_foca_calibration_keeps_half_the_curvature_of_a_parabola(steps, at):
    h = at - steps[-1]  # Heun: F_n + h/2 (g_n + (F_p - F_n)/h) = p(at) - c2 h^2 / 2
    got = fc.foca_forecast(steps, samples([A, B, C], steps), at)
    assert torch.allclose(got, poly([A, B, C], at) - C * h * h / 2)


def test_foca_of_one_point_is_reuse():
    assert torch.equal(fc.foca_forecast([3], [A], 5), A)


# -- freq ---------------------------------------------------------------------------------------

def _bands(tokens=16, channels=3, keep=2):
    """Random tensors [2, tokens, channels] whose rfft (along the tokens) lives only in the lowest
    ``keep`` bins (low) or only above them (high)."""
    x = torch.randn(2, tokens, channels, dtype=torch.float64)
    spec = torch.fft.rfft(x, dim=-2)
    low_spec, high_spec = spec.clone(), spec.clone()
    low_spec[:, keep:], high_spec[:, :keep] = 0, 0
    return torch.fft.irfft(low_spec, n=tokens, dim=-2), torch.fft.irfft(high_spec, n=tokens, dim=-2)


@pytest.mark.parametrize("steps, at", [([3, 5], 8), ([2, 3, 5], 7)])
def test_freq_exact_on_a_constant_low_band_and_a_polynomial_high_band(steps, at):
    low, high0 = _bands()
    _, high1 = _bands()
    _, high2 = _bands()
    coeffs = [low + high0, high1, high2][:len(steps)]  # low band constant in the step
    got = fc.freq_forecast(steps, samples(coeffs, steps), at, cutoff=2 / 9)  # 9 bins: keep 2
    assert torch.allclose(got, poly(coeffs, at))


def test_freq_holds_a_moving_low_band_at_its_newest_value():
    low, high = _bands()
    steps = [3, 5]
    values = [s * low + s * high for s in steps]
    got = fc.freq_forecast(steps, values, 8, cutoff=2 / 9)
    assert torch.allclose(got, 5 * low + 8 * high)


def test_lowpass_keeps_at_least_the_mean():
    x = torch.randn(4, 6, 2)
    assert torch.allclose(fc.lowpass(x, 0.0), x.mean(dim=-2, keepdim=True).expand_as(x))
    assert torch.allclose(fc.lowpass(x, 1.0), x)


@pytest.mark.parametrize("method", fc.METHODS)
def test_every_method_keeps_dtype_and_reuses_one_point(method):
    x = torch.randn(2, 8, 4).to(torch.bfloat16)
    out = fc.forecast_by(method, [3], [x], 5)
    assert out.dtype == torch.bfloat16 and torch.equal(out, x)
    line = fc.forecast_by(method, [1, 2], [x, x], 5)  # a constant stays constant
    assert torch.equal(line, x)


def test_unknown_method_in_the_runtime_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown forecast method 'spline'.*hermite"):
        fc.forecast_by("spline", [0], [A], 1)


# -- the plan field -----------------------------------------------------------------------------

PLAN = 'version: 1\nsteps: 6\nrules:\n  - sites: "*"\n    kind: block\n    steps: "2:6:2"\n    action: predict\n' \
       '    order: 2\n    method: {method}\n'


def test_plan_reads_and_writes_method():
    plan = Plan.from_yaml(PLAN.format(method="hermite"))
    assert plan.rules[0].method == "hermite"
    assert Plan.from_yaml(plan.to_yaml()).rules[0] == plan.rules[0]
    assert "method" not in Plan.from_yaml(PLAN.replace("    method: {method}\n", "")).to_dict()["rules"][0]


@pytest.mark.parametrize("text, message", [
    (PLAN.format(method="spline"), "line 9, rule 0, site '\\*': unknown forecast method 'spline'; known: "
                                   "\\['taylor', 'hermite', 'foca', 'freq'\\]"),
    (PLAN.format(method="[hermite]"), "line 9, rule 0.*unknown forecast method"),
    (PLAN.format(method="hermite").replace("predict", "reuse_residual").replace("    order: 2\n", ""),
     "line 8, rule 0, site '\\*': 'method' applies to action predict, not 'reuse_residual'"),
])
def test_bad_method_is_refused_naming_line_and_rule(text, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_yaml(text)


def test_python_built_rule_with_bad_method_is_refused():
    with pytest.raises(PlanError, match="rule 0.*unknown forecast method 'x'"):
        Plan(steps=4, rules=[Rule(sites=("*",), steps=(2,), action="predict", method="x")]).check()
    with pytest.raises(PlanError, match="'method' applies to action predict, not 'reuse'"):
        Plan(steps=4, rules=[Rule(sites=("*",), steps=(2,), action="reuse", method="foca")]).check()


def test_methods_resolve_per_site_and_step():
    model, kw = build("dit")
    plan = Plan(steps=6, rules=[Rule(sites=("*",), kind="block", steps=(2, 4), action="predict", method="foca"),
                                Rule(sites=("transformer_blocks.0",), steps=(4,), action="predict", order=2)])
    table = plan.compile(ditopt.sites(model, **kw))
    assert table.methods["transformer_blocks.0"] == ["", "", "foca", "", "taylor", ""]
    assert table.method("transformer_blocks.1", 4) == "foca" and table.method("transformer_blocks.1", 3) == "taylor"
    assert table.schedule("transformer_blocks.0") != table.schedule("transformer_blocks.1")


def test_a_table_whose_run_mixes_methods_cannot_be_swapped_in():
    model, kw = build("dit")
    sites = ditopt.sites(model, **kw)
    blocks = tuple(s.name for s in sites if s.kind == "block")
    old = Plan(steps=4, rules=[Rule(sites=("*",), kind="block", steps=(2,), action="predict")]).compile(sites)
    old.runs = {blocks[0]: blocks}
    new = Plan(steps=4, rules=[Rule(sites=("*",), kind="block", steps=(2,), action="predict"),
                               Rule(sites=(blocks[-1],), steps=(2,), action="predict", method="freq")]).compile(sites)
    assert "coalesced" in old.incompatibility(new)
    same = Plan(steps=4, rules=[Rule(sites=("*",), kind="block", steps=(2,), action="predict",
                                     method="taylor")]).compile(sites)
    assert old.incompatibility(same) is None


# -- end to end: a hermite plan on a small diffusers DiT -----------------------------------------

def test_hermite_plan_runs_eagerly_on_a_small_dit():
    """The whole model (its ``output`` site) forecast at steps 3 and 5 with order 2: each forecast
    is hermite_forecast of the outputs at the last three computed steps (the input is the same at
    every step, so forecasting the output or its residual is the same)."""
    model, kw = build("dit")
    times = [900, 800, 700, 600, 500, 400]
    plan = Plan.from_yaml('version: 1\nsteps: 6\nrules:\n  - {sites: output, steps: [3, 5], action: predict, '
                          'order: 2, method: hermite}\n')
    fast = ditopt.optimize(model, plan)
    outputs, got = {}, []
    with torch.no_grad():
        for step, t in enumerate(times):
            call = dict(kw, timestep=torch.tensor([t, t]))
            outputs[step] = model(**call, return_dict=False)[0]
            got.append(fast(**call, return_dict=False)[0])
    assert ditopt.stats(fast).decisions["output"] == ["compute", "compute", "compute", "predict", "compute", "predict"]
    for step in (0, 1, 2, 4):
        assert torch.allclose(got[step], outputs[step], atol=1e-5)
    for step, history in ((3, [0, 1, 2]), (5, [1, 2, 4])):
        want = fc.hermite_forecast(history, [outputs[s] for s in history], step)
        assert torch.allclose(got[step], want, atol=1e-4)
        taylor = fc.taylor_forecast(history, [outputs[s] for s in history], step)
        assert not torch.allclose(got[step], taylor, atol=1e-3)  # it is not the Taylor forecast


def test_block_level_methods_differ_and_report_predict():
    model, kw = build("dit")
    times = [900, 800, 700, 600, 500]
    results = {}
    for method in fc.METHODS:
        plan = Plan(steps=5, rules=[Rule(sites=("*",), kind="block", steps=(3, 4), action=Action.PREDICT, order=2,
                                         method=method)])
        fast = ditopt.optimize(model, plan)
        with torch.no_grad():
            for t in times:
                out = fast(**dict(kw, timestep=torch.tensor([t, t])), return_dict=False)[0]
        results[method] = out
        assert ditopt.stats(fast).decisions["transformer_blocks.0"][3:] == ["predict", "predict"]
    for a in fc.METHODS:
        for b in fc.METHODS:
            if a < b:
                assert not torch.allclose(results[a], results[b], atol=1e-6), (a, b)


def test_taylorseer_preset_takes_a_method():
    plan = ditopt.presets.taylorseer(steps=10, interval=3, order=2, method="hermite")
    assert plan.rules[0].method == "hermite" and plan.name == "taylorseer-3-o2-hermite"
    assert ditopt.presets.taylorseer(steps=10).rules[0].method is None  # taylor: the YAML is unchanged
    with pytest.raises(ValueError, match="method must be one of"):
        ditopt.presets.taylorseer(steps=10, method="spline")


def test_coalescing_and_resampling_keep_the_forecaster():
    """Adjacent blocks with different forecasters are separate regions; a resampled plan keeps them."""
    import ditopt
    from diffusers import DiTTransformer2DModel
    from ditopt.plan import Plan
    from ditopt.resample import resample_plan

    plan = Plan.from_yaml("""
version: 1
steps: 8
rules:
  - sites: "stack[0:2]"
    kind: block
    steps: "2:8:2"
    action: predict
    method: hermite
  - sites: "stack[2:4]"
    kind: block
    steps: "2:8:2"
    action: predict
""")
    assert [r.method for r in resample_plan(plan, 16).rules] == ["hermite", None]
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                  num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    fast = ditopt.optimize(model, plan)
    with torch.no_grad():
        fast(torch.randn(1, 4, 8, 8), timestep=torch.tensor([999]), class_labels=torch.tensor([3]))
    assert ditopt.compiled_graph(fast).table.runs == {
        "transformer_blocks.0": ("transformer_blocks.0", "transformer_blocks.1"),
        "transformer_blocks.2": ("transformer_blocks.2", "transformer_blocks.3")}
