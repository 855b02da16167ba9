"""Across ranks (issue 14, items 4 and 6): every rank takes the same decisions, a checksum mode
catches ranks whose schedules diverge, and a rank that dies or raises mid-generation makes the
others fail within the timeout, naming it and the step, instead of hanging.

The slow tests spawn 2 gloo ranks (``tests/parallel_worker.py``: ``spawn_each`` returns every
rank's result, and a rank that died as None) on the small DiT.
"""

from __future__ import annotations

import pytest
import torch

import ditopt
from ditopt.errors import DivergenceError, DitoptError, RankFailureError
from ditopt.runtime import Action, DecisionTable, Indicator, Runtime, distributed
from parallel_worker import WHOLE


def fbc_decisions(pairs: list[list[float]], below: float) -> list[str]:
    """What First-Block-Cache decides for the later blocks at each call from the indicator's
    ``[mean |change|, mean |previous|]`` of every call after the first (``Runtime.update_indicator``)."""
    out, accumulated = ["compute"], 0.0
    for change, previous in pairs:
        accumulated += change / previous
        reuse = accumulated < below
        out.append("reuse_residual" if reuse else "compute")
        accumulated = accumulated if reuse else 0.0
    return out


# -- in this process ----------------------------------------------------------------------------


def test_spec_fields_default_and_checked():
    spec = ditopt.SequenceParallel()
    assert (spec.timeout, spec.check) == (300.0, False)
    for bad in (0, -1, float("nan"), "60"):
        with pytest.raises(ditopt.PlanError, match="timeout"):
            ditopt.SequenceParallel(timeout=bad)
    assert ditopt.SequenceParallel(timeout=None).timeout is None  # the group's own timeout
    assert issubclass(DivergenceError, DitoptError) and issubclass(RankFailureError, DitoptError)
    assert distributed.ERRORS == {"divergence": DivergenceError, "failure": RankFailureError}


def test_the_indicator_decides_from_what_reduce_returns():
    """The hook the parallel op uses: the runtime decides from the reduced numbers, not its own."""
    table = DecisionTable(steps=3, actions={"b": [Action.COMPUTE] * 3}, adaptive={"b": [0] * 3}, slots={"b": "residual"},
                          indicators=[Indicator(of="a", below=0.1, node="a")])
    decided = {}
    for name, reduce in (("own", None), ("reduced", lambda parts: torch.tensor([0.01, 1.0]))):
        rt = Runtime()
        rt.set_graph(0, table)
        for step, value in enumerate((torch.ones(4), torch.full((4,), 2.0))):  # own change: 100 %
            rt.begin(999.0 - step)
            rt.update_indicator(0, 0, value, reduce=reduce)
        decided[name] = bool(rt._reuse_ok[(0, 0, 0)])
    assert decided == {"own": False, "reduced": True}


def test_divergence_message_names_the_step_the_sites_and_the_ranks():
    sites = ["blocks.0", "blocks.1"]
    reuse, compute = (distributed._CODES.index(a) for a in (Action.REUSE_RESIDUAL, Action.COMPUTE))
    rows = [[2, 1, 0, 11], [2, 2, 0, 22]]  # rank 1 is a step ahead
    codes = [[reuse, compute, compute, compute], [compute, compute, compute, compute]]
    text = distributed._divergence(rows, codes, sites)
    assert "diverged at step 1" in text and "rank 0 and rank 1 disagree" in text
    assert "rank 0 at step 1 (CFG branch 0), rank 1 at step 2 (CFG branch 0)" in text
    assert "blocks.0: rank 0 reuse_residual, rank 1 compute" in text and "blocks.1:" not in text


def test_one_rank_graph_averages_the_indicator_and_checks_each_call(one_rank):
    from ditopt.small_models import build, timesteps

    model, kwargs = build("dit")
    plan = ditopt.presets.first_block_cache(0.05, steps=3)
    fast = ditopt.optimize(model, plan, parallel=ditopt.SequenceParallel(mode="ring", timeout=10, check=True),
                           **WHOLE)
    single = ditopt.optimize(model, plan, **WHOLE)  # marks held by one wrapper reach every wrapper of the model
    with torch.no_grad():
        for t in timesteps(3, kwargs["timestep"]):
            assert (fast(**{**kwargs, "timestep": t}).sample - single(**{**kwargs, "timestep": t}).sample).abs().max() \
                < 1e-5
    targets = [n.target for n in ditopt.compiled_graph(fast).rewritten.graph.nodes]
    assert torch.ops.ditopt.update_indicator_across.default in targets
    assert torch.ops.ditopt.update_indicator.default not in targets
    assert targets.index(torch.ops.ditopt.check_decisions.default) == \
        targets.index(torch.ops.ditopt.begin_step.default) + 1  # before any decision
    assert ditopt.stats(fast).decisions == ditopt.stats(single).decisions
    # the group the collectives use has the spec's timeout
    group = next(n.args[8] for n in ditopt.compiled_graph(fast).rewritten.graph.nodes
                 if n.target is distributed.sp_attention)
    assert distributed._TIMEOUTS[group] == 10.0


# -- spawned ranks (slow) -------------------------------------------------------------------------

THRESHOLD, STEPS = 0.01, 6


@pytest.fixture(scope="module")
def agreeing():
    """Per rank: the First-Block-Cache run on per-rank data, then the (diverged) FORA-2 runs."""
    from parallel_worker import spawn_each

    found = spawn_each("in_turn", [("adaptive_run", {"mode": "ulysses", "threshold": THRESHOLD, "steps": STEPS}),
                                   ("diverged_run", ["same", "plan", "step", "inputs"])])
    assert all(isinstance(r, list) for r in found), found  # a rank that raised outside the runs, or died
    return found


@pytest.fixture(scope="module")
def adaptive(agreeing):
    return [r[0] for r in agreeing]


@pytest.fixture(scope="module")
def diverged(agreeing):
    return [r[1] for r in agreeing]


@pytest.mark.slow
def test_different_data_per_rank_same_decisions_under_first_block_cache(adaptive):
    r0, r1 = adaptive
    assert "error" not in r0 and "error" not in r1, (r0, r1)
    assert r0["decisions"] == r1["decisions"]
    assert r0["mean"] == r1["mean"]  # the same numbers on every rank, bit for bit
    later = r0["decisions"]["transformer_blocks.1"]
    assert later == fbc_decisions(r0["mean"], THRESHOLD)  # decided from the average
    assert "reuse_residual" in later and "compute" in later[1:]
    # each rank's own indicator would have decided otherwise: the ranks would have diverged
    own = [fbc_decisions(r["local"], THRESHOLD) for r in (r0, r1)]
    assert own[0] != own[1] and r0["local"] != r1["local"]
    # bytes: 2 float32 all-reduced at each call after the first
    assert r0["comm_bytes"]["all_reduce"] == (STEPS - 1) * 8 and "check" not in r0["comm_bytes"]


@pytest.mark.slow
def test_check_mode_passes_ranks_that_agree(diverged):
    for rank in diverged:
        assert rank["same"]["calls"] == 3 and "error" not in rank["same"], rank["same"]
        assert rank["same"]["comm_bytes"]["check"] == 3 * 40  # the checksums (5 int64) at every call


@pytest.mark.slow
def test_check_mode_catches_ranks_called_with_different_latents(diverged):
    """Each rank computes a slice of the same tokens: a rank given other latents (noise drawn
    unseeded on each rank) mixed two samples into one output, silently. ``check=True`` names it."""
    for rank in diverged:
        found = rank["inputs"]
        assert found["calls"] == 0, found  # the first call raised, before any decision
        assert found["error"].startswith("DivergenceError: ditopt: sequence-parallel ranks were called with "
                                         "different inputs at step 0: hidden_states (sum rank 0 "), found["error"]
        assert "timestep" not in found["error"] and "seeded alike on every rank" in found["error"]


@pytest.mark.slow
@pytest.mark.parametrize("how, where", [
    ("plan", "decisions planned at this step: transformer_blocks.0: rank 0 reuse_residual, rank 1 compute"),
    ("step", "they are at different steps: rank 0 at step 1 (CFG branch 0), rank 1 at step 2 (CFG branch 0)")])
def test_check_mode_catches_a_diverged_schedule_on_every_rank(diverged, how, where):
    for rank in diverged:
        found = rank[how]
        assert found["calls"] == 1, found  # the second call raised, before any decision
        assert found["error"].startswith("DivergenceError: ditopt: sequence-parallel ranks diverged at step 1")
        assert "rank 0 and rank 1 disagree" in found["error"] and where in found["error"]


@pytest.mark.slow
def test_a_killed_rank_makes_the_other_fail_at_once_naming_it_and_the_step():
    from parallel_worker import spawn_each

    timeout = 20.0
    r0, r1 = spawn_each("failing_run", {"how": "kill", "timeout": timeout, "steps": 3})
    assert r1 is None  # SIGKILLed mid-call
    assert r0["error"].startswith("RankFailureError: ditopt: sequence parallelism: rank 1 is gone"), r0
    assert "of step 2 (CFG branch 0) on rank 0" in r0["error"] and r0["step"] == 2
    assert r0["elapsed"] < timeout  # measured: gloo raises at once when the peer's socket closes


@pytest.mark.slow
def test_a_rank_that_raises_and_lives_on_makes_the_other_fail_within_the_timeout():
    from parallel_worker import spawn_each

    timeout = 4.0
    r0, r1 = spawn_each("failing_run", {"how": "raise", "timeout": timeout, "steps": 3})
    assert r1["error"] == "RuntimeError: injected failure on rank 1" and r1["step"] == 2
    assert r0["error"].startswith("RankFailureError: ditopt: sequence parallelism: rank 1 did not answer within "
                                  "the 4 s timeout"), r0
    assert "of step 2 (CFG branch 0) on rank 0" in r0["error"]
    assert timeout - 0.5 <= r0["elapsed"] <= timeout + 10  # the timeout, not the group's 30 minutes
