"""Whole-pipeline tests on hand-written DiT stacks (``compile_graph`` on symbolic_trace graphs).

Each result is checked against :class:`synthetic.HandCache`, the plan's meaning written out by
hand with no ditopt code, and the work skipped is counted with the ``ditopt_test::count`` op.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ditopt
from ditopt.backend import compile_graph
from synthetic import COND, COUNTS, HandCache, actions_of, block_plan, eager, latents, make_stack, targets, timesteps


def compile_stack(model, plan, example, **options):
    return compile_graph(fx.symbolic_trace(model), plan, example, **options)


def test_all_compute_plan_is_bit_identical_to_eager():
    model = make_stack(3)
    steps = 5
    xs, ts = latents(2 * steps), timesteps(steps)
    run, backend = compile_stack(model, ditopt.presets.all_compute(steps), [xs[0], ts[0]])

    assert targets(backend.last.rewritten, nested=True)[COND] == 0
    for step, t in enumerate(ts):
        for branch in range(2):
            x = xs[2 * step + branch]
            assert torch.equal(run(x, t)[0], eager(model, x, t)[0])
    assert set(backend.runtime.decisions()["blocks.2"]) == {"compute"}
    assert backend.runtime.store.nbytes == 0


def test_fora_block_plan_reuses_at_the_planned_steps_and_matches_by_hand():
    model = make_stack(3)
    steps, interval = 7, 3
    xs, ts = latents(steps), timesteps(steps)
    run, backend = compile_stack(model, ditopt.presets.fora(interval, steps, level="block"), [xs[0], ts[0]])
    reuse_steps = [s for s in range(steps) if s % interval]
    reference = HandCache(model, actions_of({i: ("reuse_residual", reuse_steps) for i in range(3)}))

    for step, (x, t) in enumerate(zip(xs, ts)):
        torch.testing.assert_close(run(x, t)[0], reference(step, 0, x, timestep=t)[0], rtol=0, atol=1e-6)

    decisions = backend.runtime.decisions()
    planned = ["reuse_residual" if s in reuse_steps else "compute" for s in range(steps)]
    for i in range(3):
        assert decisions[f"blocks.{i}"] == planned
        assert decisions[f"blocks.{i}.attn"] == [d if d == "compute" else "skipped" for d in planned]
    assert backend.runtime.store.nbytes == xs[0].numel() * 4  # one residual for the run of 3 blocks (coalesced)
    assert backend.last.table.runs == {"blocks.0": ("blocks.0", "blocks.1", "blocks.2")}
    run_per_block, per_block = compile_stack(model, ditopt.presets.fora(interval, steps, level="block"),
                                             [xs[0], ts[0]], coalesce=False)
    for step, (x, t) in enumerate(zip(xs, ts)):
        torch.testing.assert_close(run_per_block(x, t)[0], reference(step, 0, x, timestep=t)[0], rtol=0, atol=1e-6)
    assert per_block.runtime.store.nbytes == 3 * xs[0].numel() * 4  # one residual per block
    assert per_block.runtime.decisions() == decisions


def test_a_reused_block_does_not_run():
    model = make_stack(3, counting=True)
    steps = 5
    table = {0: ("reuse_residual", [2, 4]), 1: ("reuse", [1, 2, 3]), 2: ("reuse_residual", [1, 3, 4])}
    xs, ts = latents(steps), timesteps(steps)
    run, _ = compile_stack(model, block_plan(steps, table), [xs[0], ts[0]])

    for step, (x, t) in enumerate(zip(xs, ts)):
        COUNTS.clear()
        run(x, t)
        computing = {i for i, (_, reuse) in table.items() if step not in reuse}
        assert dict(COUNTS) == {i: 1 for i in computing}, f"step {step}"


def test_cfg_branches_keep_separate_caches():
    model = make_stack(2)
    steps = 4
    cond, uncond, ts = latents(steps, seed=1), latents(steps, seed=2), timesteps(steps)
    run, backend = compile_stack(model, ditopt.presets.fora(2, steps, level="block"), [cond[0], ts[0]])
    reference = HandCache(model, actions_of({i: ("reuse_residual", [1, 3]) for i in range(2)}))

    for step, t in enumerate(ts):
        for branch, x in enumerate((cond[step], uncond[step])):
            torch.testing.assert_close(run(x, t)[0], reference(step, branch, x, timestep=t)[0], rtol=0, atol=1e-6)

    store = backend.runtime.store
    per_branch = [store.latest((0, "blocks.0", "residual0", b)).value for b in (0, 1)]  # the coalesced run's
    assert not torch.equal(*per_branch)
    assert store.nbytes == 2 * cond[0].numel() * 4  # per branch, one residual for both blocks
    assert backend.runtime.decisions()["blocks.0"] == ["compute", "compute", "reuse_residual", "reuse_residual"] * 2


def test_a_new_generation_starts_from_scratch():
    model = make_stack(2)
    steps = 4
    xs, ts = latents(steps), timesteps(steps)
    run, backend = compile_stack(model, ditopt.presets.fora(2, steps, level="block"), [xs[0], ts[0]])

    first = [run(x, t)[0] for x, t in zip(xs, ts)]
    second = [run(x, t)[0] for x, t in zip(xs, ts)]  # the timestep goes back up

    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert backend.runtime.state.generation == 1
    assert len(backend.runtime.decisions()["blocks.0"]) == steps


@st.composite
def stacks_and_plans(draw):
    depth = draw(st.integers(1, 4))
    steps = draw(st.integers(2, 6))
    table = {i: (draw(st.sampled_from(["reuse", "reuse_residual"])), sorted(draw(st.sets(st.integers(1, steps - 1)))))
             for i in range(depth)}
    return dict(depth=depth, dim=draw(st.sampled_from([4, 8])), seq=draw(st.integers(1, 6)),
                batch=draw(st.integers(1, 2)), steps=steps, seed=draw(st.integers(0, 2**16)), table=table)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=stacks_and_plans())
def test_random_residual_stacks_match_the_hand_written_plan(case):
    model = make_stack(case["depth"], case["dim"], seed=case["seed"])
    steps, table = case["steps"], case["table"]
    xs = latents(steps, batch=case["batch"], seq=case["seq"], dim=case["dim"], seed=case["seed"] + 1)
    ts = timesteps(steps)
    run_all, _ = compile_stack(model, ditopt.presets.all_compute(steps), [xs[0], ts[0]])
    run, backend = compile_stack(model, block_plan(steps, table), [xs[0], ts[0]])
    reference = HandCache(model, actions_of(table))

    for step, (x, t) in enumerate(zip(xs, ts)):
        assert torch.equal(run_all(x, t)[0], eager(model, x, t)[0])
        torch.testing.assert_close(run(x, t)[0], reference(step, 0, x, timestep=t)[0], rtol=0, atol=1e-5)

    decisions = backend.runtime.decisions()
    for i, (action, reuse) in table.items():
        assert decisions[f"blocks.{i}"] == [action if s in reuse else "compute" for s in range(steps)]
