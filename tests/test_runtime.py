"""Step tracking and the cache store."""

import pytest
import torch

from ditopt.runtime import CacheStore, StepState


def test_step_state_follows_the_timestep():
    s = StepState()
    seen = [s.observe(t) for t in (999.0, 999.0, 800.0, 800.0, 600.0, 999.0, 800.0)]
    assert seen == [(0, 0, True), (0, 1, False), (1, 0, False), (1, 1, False), (2, 0, False), (0, 0, True),
                    (1, 0, False)]
    assert s.generation == 1


def test_step_state_override_and_reset():
    s = StepState()
    s.observe(999.0)
    s.set(5, branch=1)
    assert s.observe(999.0) == (5, 1, False)
    assert s.observe(10.0) == (6, 0, False)
    s.reset()
    assert s.observe(10.0) == (0, 0, True)
    with pytest.raises(ValueError, match="step"):
        s.set(-1)


def test_cache_store_keeps_depth_and_counts_bytes():
    store = CacheStore(depth=2)
    key = (0, "blocks.1", "residual0", 0)
    for step in range(3):
        store.put(key, step, torch.full((2, 3), float(step)))
    assert [e.step for e in store.history(key)] == [1, 2]
    assert store.nbytes == 2 * 6 * 4
    store.put(key, 3, torch.zeros(4))  # a new shape invalidates the old history
    assert [e.step for e in store.history(key)] == [3] and store.has(key, (4,)) and not store.has(key, (2, 3))
    store.clear()
    assert store.nbytes == 0 and store.latest(key) is None


def test_many_optimised_models_of_one_class_in_one_process():
    """Dynamo shares compiled code across instances of a class; the tenth model must still work."""
    import ditopt
    from diffusers import DiTTransformer2DModel

    x, y = torch.randn(1, 4, 8, 8), torch.tensor([3])
    for i in range(10):
        torch.manual_seed(i)
        model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                      num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
        fast = ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=2, level="block"))
        with torch.no_grad():
            out = [fast(x, timestep=torch.tensor([t]), class_labels=y).sample for t in (900, 100)]
            ref = model(x, timestep=torch.tensor([900]), class_labels=y).sample
        assert torch.equal(out[0], ref)
        assert ditopt.stats(fast).decisions["transformer_blocks.0"] == ["compute", "reuse_residual"]


def test_running_past_the_plans_steps_warns_once_per_generation():
    import warnings

    import ditopt
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                  num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    fast = ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=2, level="block"))
    x, y = torch.randn(1, 4, 8, 8), torch.tensor([3])

    def generation(timesteps):
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            ditopt.reset(fast)
            for t in timesteps:
                fast(x, timestep=torch.tensor([t]), class_labels=y)
        return [w for w in caught if issubclass(w.category, RuntimeWarning) and "ditopt" in str(w.message)]

    assert generation((900, 500)) == []
    over = generation((900, 600, 300, 100))
    assert len(over) == 1 and "step 2 is past the plan's 2 steps" in str(over[0].message)
    assert ditopt.stats(fast).decisions["transformer_blocks.0"] == ["compute", "reuse_residual", "compute", "compute"]
    assert len(generation((900, 600, 300))) == 1  # again in the next generation


def test_a_generation_shorter_than_the_plan_is_warned_once_at_the_next_generation():
    """A plan for 6 steps (a preset's default count, say) on a 4-step sampler follows the plan's
    first 4 steps only; said once, when the next generation starts, not after an explicit reset."""
    import warnings

    import ditopt
    from ditopt.small_models import MODELS

    model, kwargs = MODELS["dit"]()
    ts = [torch.full_like(kwargs["timestep"], v) for v in (900, 700, 500, 300)]

    def generations(fast, count, reset=False):
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            for _ in range(count):
                if reset:
                    ditopt.reset(fast)
                for t in ts:
                    fast(**{**kwargs, "timestep": t})
        return [str(w.message) for w in caught if "ditopt" in str(w.message)]

    fast = ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=6, level="block"))
    assert generations(fast, 1) == []  # not known to be over yet
    said = generations(fast, 3)
    assert len(said) == 1 and "ran 4 steps of the plan's 6" in said[0] and "plan.resample(4)" in said[0]
    assert generations(ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=6, level="block")), 3,
                       reset=True) == []
    assert generations(ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=4, level="block")), 3) == []


def test_a_step_callback_tells_every_step_and_no_timestep_is_read_after_the_first_call(monkeypatch):
    """As a diffusers pipeline calls ``callback_on_step_end``: two calls (CFG) per step, then the
    callback. Decisions and outputs equal the inferred run's; the timestep is never read."""
    import ditopt
    from ditopt.runtime.step_state import StepState
    from ditopt.small_models import MODELS

    model, kwargs = MODELS["dit"]()
    steps, plan = 4, ditopt.presets.fora(interval=2, steps=4, level="block")
    timesteps = [torch.full_like(kwargs["timestep"], v) for v in (999, 700, 400, 100)]
    inferred = ditopt.optimize(model, plan)
    told = ditopt.optimize(model, plan)
    reads = []
    observe = StepState.observe

    def counting(self, t, fingerprint=None):
        return observe(self, (lambda: reads.append(1) or t()) if callable(t) else t, fingerprint)

    monkeypatch.setattr(StepState, "observe", counting)

    class Pipe:
        num_timesteps = steps

    callback = ditopt.step_callback(told)
    outs = {}
    with torch.no_grad():
        for name, fast in (("inferred", inferred), ("told", told)):
            reads.clear()
            outs[name] = []
            for _ in range(2):  # two generations
                for i, t in enumerate(timesteps):
                    outs[name] += [fast(**{**kwargs, "timestep": t}, return_dict=False)[0] for _ in range(2)]
                    if fast is told:
                        callback(Pipe(), i, t, {})
            outs[name + " reads"] = len(reads)
    assert outs["inferred reads"] == 2 * steps * 2 and outs["told reads"] == 0
    assert ditopt.stats(told).decisions == ditopt.stats(inferred).decisions
    assert ditopt.stats(told).generation == 1
    for a, b in zip(outs["told"], outs["inferred"]):
        assert torch.equal(a, b)
