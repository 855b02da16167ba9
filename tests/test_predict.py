"""The ``predict`` action: a Taylor forecast from the last computed steps of a site."""

import pytest
import torch

import ditopt
from ditopt.errors import PlanError
from ditopt.plan import Plan, Rule
from ditopt.runtime import taylor_forecast


def test_forecast_is_exact_on_polynomials_of_its_order():
    s = [2, 3, 5]
    poly = lambda t: 0.5 * t * t - 3 * t + 2  # noqa: E731
    ys = [torch.full((3,), poly(t)) for t in s]
    assert torch.allclose(taylor_forecast(s, ys, 7), torch.full((3,), poly(7)))
    line = lambda t: 2 * t + 1  # noqa: E731
    assert torch.allclose(taylor_forecast([3, 5], [torch.tensor(line(3.)), torch.tensor(line(5.))], 8),
                          torch.tensor(line(8.)))
    assert torch.equal(taylor_forecast([4], [torch.tensor(1.5)], 9), torch.tensor(1.5))


def test_plan_reads_and_writes_order():
    plan = Plan.from_yaml('version: 1\nsteps: 6\nrules:\n  - {sites: "*", kind: block, steps: "2:6:2", '
                          'action: predict, order: 2}\n')
    assert plan.rules[0].order == 2
    assert Plan.from_yaml(plan.to_yaml()).rules[0] == plan.rules[0]


@pytest.mark.parametrize("rule, message", [
    ('{sites: "*", steps: [2], action: reuse, order: 1}', "'order' applies to action predict"),
    ('{sites: "*", steps: [2], action: predict, order: 3}', "'order' must be one of"),
    ('{sites: "*", steps: [0], action: predict}', "predict at step 0"),
])
def test_bad_predict_rules(rule, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_yaml(f"version: 1\nsteps: 4\nrules:\n  - {rule}\n")


class Ramp(torch.nn.Module):
    """A residual stack whose block residuals are linear in the timestep, so an order-1 forecast
    of a block's residual is exact and reuse is not."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block() for _ in range(2)])

    def forward(self, hidden_states, timestep):
        for b in self.blocks:
            hidden_states = b(hidden_states, timestep)
        return hidden_states


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attn()

    def forward(self, x, t):
        return x + self.attn(x) * 0 + t.reshape(-1, 1, 1) / 1000.0


class Attn(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.scaled_dot_product_attention(x, x, x)


def test_predict_extrapolates_a_linear_residual_exactly():
    model = Ramp().eval()
    x = torch.randn(1, 4, 8)
    steps = [900, 800, 700, 600, 500]
    plan = Plan(steps=5, rules=[Rule(sites=("*",), kind="block", steps=(2, 4), action="predict")])
    fast = ditopt.optimize(model, plan)
    reuse = ditopt.optimize(Ramp().eval(), Plan(steps=5, rules=[
        Rule(sites=("*",), kind="block", steps=(2, 4), action="reuse_residual")]))
    with torch.no_grad():
        for t in steps:
            ts = torch.tensor([float(t)])
            want = model(x, ts)
            assert torch.allclose(fast(x, ts), want, atol=1e-5)
            got_reuse = reuse(x, ts)
        assert not torch.allclose(got_reuse, want, atol=1e-3)  # reuse is stale at step 4
    assert ditopt.stats(fast).decisions["blocks.0"] == ["compute", "compute", "predict", "compute", "predict"]
