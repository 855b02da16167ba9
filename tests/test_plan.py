"""Plans: schema, round trip, and one clear error per kind of bad plan, before any rewrite."""

import copy

import pytest
import torch

import ditopt
from ditopt import Plan, PlanError
from real_models import build

GOOD = """\
version: 1
steps: 10
rules:
  - sites: "blocks.*"
    kind: block
    steps: "1:10:2"
    action: reuse_residual
  - sites: ["blocks.*", "!blocks.0"]
    kind: attention
    steps: [2, 4]
    action: reuse
"""


def test_round_trip_and_steps():
    plan = Plan.from_yaml(GOOD)
    assert plan.rules[0].step_list(10) == [1, 3, 5, 7, 9]
    assert plan.rules[1].sites == ("blocks.*", "!blocks.0")
    again = Plan.from_yaml(plan.to_yaml())
    assert again.to_dict() == plan.to_dict()


def test_load_names_the_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(GOOD.replace("version: 1", "version: 7"))
    with pytest.raises(PlanError, match="p.yaml.*unknown plan version 7"):
        Plan.load(path)
    with pytest.raises(PlanError, match="not found"):
        Plan.load(tmp_path / "missing.yaml")


@pytest.mark.parametrize("text, message", [
    ("version: 1\nsteps: 10\nrules: [\n  - sites: x\n", "line .*malformed YAML"),
    (GOOD.replace("version: 1", "version: 2"), "unknown plan version 2"),
    (GOOD.replace("action: reuse\n", "action: teleport\n"), "line 11, rule 1, site 'blocks.\\*,!blocks.0': unknown action 'teleport'"),
    (GOOD.replace('"1:10:2"', "[3, 12]"), "line 6, rule 0, site 'blocks.\\*': step 12 is out of range 0..9"),
    (GOOD.replace('"1:10:2"', '"0:10:2"'), "rule 0.*reuse_residual at step 0: nothing has been computed"),
    (GOOD.replace("kind: block", "kind: blob"), "unknown kind 'blob'"),
    (GOOD.replace("steps: 10", "steps: -3"), "'steps' must be an integer in \\[1, 10000\\], got -3"),
    (GOOD.replace("    kind: block\n", "    knd: block\n"), "unknown rule field"),
    ("- 1\n- 2\n", "must be a mapping"),
])
def test_bad_plan_text_raises_one_clear_error(text, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_yaml(text)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("rules, message", [
    ('[{sites: "blocks.*", action: reuse_residual, steps: "1:"}]', "rule 0, site 'blocks.\\*': pattern 'blocks.\\*' matches no site"),
    ('[{sites: "transformer_blocks.*", kind: feedforward, action: reuse, steps: [1]}, '
     '{sites: "nope.*", action: reuse, steps: [2]}]', "rule 1, site 'nope.\\*'"),
])
def test_plan_for_another_model_fails_before_anything_is_rewritten(rules, message):
    model, kwargs = build("dit")
    before = _state(model)
    forward = model.forward
    plan = Plan.from_yaml(f"version: 1\nsteps: 4\nrules: {rules}\n")
    with pytest.raises(PlanError, match=message):
        ditopt.optimize(model, plan)
    assert model.forward == forward and not hasattr(model, "_ditopt_runtime")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_errors_found_only_in_the_graph_are_raised_unwrapped_on_first_call():
    """reuse_residual on an attention site whose output has no same-shaped input."""
    model, kwargs = build("pixart")  # cross-attention: attn2's output is shaped like its query input
    plan = Plan.from_yaml('version: 1\nsteps: 4\nrules:\n  - sites: "transformer_blocks.0.norm1*"\n'
                          '    action: reuse\n    steps: [1]\n')
    fast = ditopt.optimize(model, plan)  # norm1 is a module, so the cheap check passes
    with pytest.raises(PlanError, match="rule 0, site 'transformer_blocks.0.norm1\\*': pattern .* matches no site"):
        with torch.no_grad():
            fast(**kwargs)
    with torch.no_grad():  # the model itself is untouched and still runs
        model(**kwargs)


def test_a_model_dynamo_cannot_capture_whole_raises_capture_error_naming_it():
    """Data-dependent Python control flow (as Lumina2's mask handling has) cannot be one graph:
    the first call raises ditopt's CaptureError naming the model class, with dynamo's reason."""

    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))

        def forward(self, hidden_states, timestep):
            for block in self.blocks:
                hidden_states = hidden_states + block(hidden_states)
            if int(hidden_states.abs().sum()) > 0:  # a Python branch on a tensor's value
                return hidden_states * 2
            return hidden_states

    model = DataDependent().eval()
    before = copy.deepcopy(model.state_dict())
    fast = ditopt.optimize(model, ditopt.presets.all_compute(steps=2))
    with torch.no_grad(), pytest.raises(ditopt.CaptureError, match="could not capture DataDependent as one graph"):
        fast(torch.randn(2, 4), torch.tensor([1.0]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_adaptive_rule_must_not_reuse_its_watched_site():
    model, kwargs = build("dit")
    plan = Plan.from_yaml("""\
version: 1
steps: 4
rules:
  - sites: "transformer_blocks.0"
    action: reuse_residual
    steps: [2]
  - sites: "transformer_blocks.*"
    kind: block
    action: reuse_residual
    when: {indicator: rel_l1, of: transformer_blocks.0, below: 0.1}
""")
    fast = ditopt.optimize(model, plan)
    with pytest.raises(PlanError, match="must compute at every step the rule decides"):
        with torch.no_grad():
            fast(**kwargs)


def test_mixing_reuse_kinds_on_one_site_is_refused():
    model, kwargs = build("dit")
    plan = Plan.from_yaml("""\
version: 1
steps: 4
rules:
  - {sites: "transformer_blocks.1", action: reuse_residual, steps: [1]}
  - {sites: "transformer_blocks.1", action: reuse, steps: [3]}
""")
    with pytest.raises(PlanError, match="site 'transformer_blocks.1': a site takes one kind of reuse"):
        with torch.no_grad():
            ditopt.optimize(model, plan)(**kwargs)


def test_presets_are_plans():
    fora = ditopt.presets.fora(interval=3, steps=9)
    assert fora.rules[0].step_list(9) == [1, 2, 4, 5, 7, 8]
    assert Plan.from_yaml(fora.to_yaml()).to_dict() == fora.to_dict()
    fb = ditopt.presets.first_block_cache(0.1, steps=20)
    assert fb.rules[0].when.below == 0.1
    with pytest.raises(ValueError):
        ditopt.presets.fora(interval=0)
    assert copy.deepcopy(fb).to_yaml() == fb.to_yaml()
