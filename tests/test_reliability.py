"""Never a stale tensor: generations, exceptions, wrappers, threads, per-token timesteps, drop-in.

Each silent-failure test compares an optimised model's output with a fresh run of the same calls
(a freshly optimised model fed the calls of the generation the output belongs to), or asserts a
clear error. The hypothesis test at the end drives random call sequences against a reference of
the semantics written independently of the runtime.
"""

from __future__ import annotations

import copy
import gc
import os
import pickle
import threading

import pytest
import torch
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

import ditopt
from ditopt.api import runtime_of
from ditopt.errors import DitoptError
from ditopt.runtime import ConcurrentCallError, StepState
from ditopt.runtime import session

STEPS = 4
X = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def dit(layers: int = 2, seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                 num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


def fora(interval: int = 2):
    return ditopt.presets.fora(interval=interval, steps=STEPS, level="block")


def call(model, t, label=3, x=X):
    with torch.no_grad():
        return model(x, timestep=torch.tensor([t]), class_labels=torch.tensor([label])).sample


def fresh_run(model, plan, calls):
    """What a freshly optimised copy of ``model`` gives for each of ``calls`` ((t, label) pairs)."""
    fresh = ditopt.optimize(model, plan)
    return [call(fresh, t, label) for t, label in calls]


@pytest.fixture(scope="module")
def model():
    return dit()


# -- generations -----------------------------------------------------------------------------------
def test_a_restart_below_the_known_schedule_is_a_new_generation(model):
    fast = ditopt.optimize(model, fora())
    for t in (999, 749, 499, 249):  # a whole generation: its schedule is known from now on
        call(fast, t)
    for t in (999, 749, 499):  # interrupted after t=499
        call(fast, t)
    restart = [(124, 3), (60, 3)]  # image-to-image lower down: not what the schedule has next
    outs = [call(fast, t, label) for t, label in restart]
    for out, ref in zip(outs, fresh_run(model, fora(), restart)):
        assert torch.equal(out, ref)
    assert ditopt.stats(fast).generation == 2


def test_a_cache_older_than_another_graphs_compute_is_not_reused(model):
    """FORA-2: batch 1 at steps 0-1, a batch of two at step 2 (another graph; it computes), batch 1
    again at step 3, a reuse step: the batch-1 graph's newest cache is step 0's, older than step
    2's compute, so step 3 computes instead of reusing features three steps old. Step 5 (after
    step 4 computed at batch 1) reuses again."""
    plan = ditopt.presets.fora(interval=2, steps=6, level="block")
    fast = ditopt.optimize(model, plan)
    for t in (999, 833):
        call(fast, t)
    with torch.no_grad():
        fast(torch.cat([X, X]), timestep=torch.tensor([666, 666]), class_labels=torch.tensor([3, 3]))
    assert torch.equal(call(fast, 499), call(model, 499))
    call(fast, 333)
    assert not torch.equal(call(fast, 166), call(model, 166))
    rows = ditopt.stats(fast).decisions["transformer_blocks.0"]
    assert rows == ["compute", "reuse_residual", "compute", "compute", "compute", "reuse_residual"]


def test_a_sampler_that_counts_up_is_seen_at_its_third_step(model):
    """Z-Image's pipeline hands its model t rising from 0 to 1. Read as one generation from its
    third step (the first two computed, their caches dropped): FORA reuses from then on, each
    output from step 2 on is the one steps told explicitly give, and the next generation (a
    fall back to 0) counts up from its first step."""
    rising = [0.0, 0.25, 0.5, 0.75]
    fast = ditopt.optimize(model, fora())
    told = ditopt.optimize(model, fora())
    first, second = [call(fast, t) for t in rising], [call(fast, t) for t in rising]
    ref = []
    for step, t in enumerate(rising):
        runtime_of(told).state.tell(step)
        ref.append(call(told, t))
    own = [call(model, t) for t in rising]
    assert torch.equal(first[0], own[0]) and torch.equal(first[1], own[1])  # computed, not reused
    assert torch.equal(first[2], ref[2]) and torch.equal(first[3], ref[3])
    assert not torch.equal(first[3], own[3])  # step 3 reused step 2
    assert all(torch.equal(a, b) for a, b in zip(second, ref))
    state = runtime_of(fast).state
    assert state.rising and ditopt.stats(fast).generation == 1 and state.step == 3


def test_the_direction_turns_only_on_three_one_step_generations():
    s = StepState()  # a stray call, then a generation counting down: nothing turns
    assert [s.observe(t) for t in (500.0, 999.0, 949.0, 899.0)] == [(0, 0, True), (0, 0, True), (1, 0, False),
                                                                     (2, 0, False)]
    assert not s.rising
    s = StepState()  # counting up with two CFG calls a step
    seen = [s.observe(t) for t in (0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.5, 1.5)]
    assert seen[4:] == [(2, 0, True), (2, 1, False), (3, 0, False), (3, 1, False)] and s.rising
    assert [s.observe(t) for t in (1.0, 0.5, 0.0, -0.5)] == [(0, 0, True), (0, 0, True), (2, 0, True), (3, 0, False)]
    assert not s.rising  # and back: three one-step generations begun by falls


def test_profile_and_tune_read_a_sampler_that_counts_up(model):
    def run(tr):
        x = X
        for t in (0.0, 0.25, 0.5, 0.75):
            x = x - 0.1 * call(tr, t, x=x)
        return x

    rmap = ditopt.profile(model, run, steps=4, progress=False)
    assert rmap.steps == 4 and not torch.isnan(rmap.metric("rel_l1")[1:]).all()
    tuned = ditopt.tune(model, run, rmap, budget=0.75, progress=False)
    assert tuned.best.compute_fraction <= 0.75 and tuned.best.psnr > 0


def test_generation_block_starts_fresh_where_inference_cannot_tell(model):
    """A restart exactly at the timestep the interrupted run had next looks like its next step:
    inside ``ditopt.generation`` it is a new generation all the same."""
    fast = ditopt.optimize(model, fora())
    with ditopt.generation(fast):
        for t in (999, 749, 499):
            call(fast, t)
    assert ditopt.stats(fast).cache_bytes == 0  # the block freed its caches
    with ditopt.generation(fast):
        outs = [call(fast, t) for t in (249, 124)]
    for out, ref in zip(outs, fresh_run(model, fora(), [(249, 3), (124, 3)])):
        assert torch.equal(out, ref)


def test_a_call_that_fails_while_captured_ends_the_generation(model):
    """A call of a new shape fails in capture, before the runtime sees it: the generation did not
    end, so a retried CFG step was taken for branches 1 and 2 and read the other branch's cache."""
    fast = ditopt.optimize(model, fora())
    [call(fast, t, label) for t, label in CFG[:3]]  # step 0, and step 1's first branch
    with pytest.raises(RuntimeError):
        call(fast, CFG[3][0], CFG[3][1], x=torch.randn(1, 3, 8, 8))  # 3 channels: the model refuses it
    assert ditopt.stats(fast).cache_bytes == 0
    outs = [call(fast, t, label) for t, label in CFG[2:]]  # step 1 retried: a new generation
    for out, ref in zip(outs, fresh_run(model, fora(), CFG[2:])):
        assert torch.equal(out, ref)


def test_generation_block_ends_the_generation_when_it_raises(model):
    fast = ditopt.optimize(model, fora())
    with pytest.raises(KeyError):
        with ditopt.generation(fast):
            call(fast, 999)
            raise KeyError("the caller's loop failed")
    assert ditopt.stats(fast).cache_bytes == 0
    assert torch.equal(call(fast, 749), fresh_run(model, fora(), [(749, 3)])[0])


def test_an_exception_inside_the_model_ends_the_generation(model):
    """A bad class label raises at step 1 of a CFG loop; the retried step must not read the other
    branch's cache (the branch counter must not shift): the next call starts afresh."""
    fast = ditopt.optimize(model, fora())
    for label in (3, 0):  # step 0: cond, uncond
        call(fast, 999, label)
    with pytest.raises(IndexError):
        call(fast, 749, 50)  # out of the embedding's range
    assert ditopt.stats(fast).cache_bytes == 0
    retry = [(749, 3), (749, 0), (499, 3), (499, 0)]
    outs = [call(fast, t, label) for t, label in retry]
    for out, ref in zip(outs, fresh_run(model, fora(), retry)):
        assert torch.equal(out, ref)


def test_steps_told_by_the_callback_survive_an_exception(model):
    fast = ditopt.optimize(model, fora())
    callback = ditopt.step_callback(fast, steps=STEPS)
    call(fast, 999)
    callback(0, 999, None)
    with pytest.raises(IndexError):
        call(fast, 749, 50)
    out = call(fast, 749)  # a new generation, starting here
    assert torch.equal(out, fresh_run(model, fora(), [(749, 3)])[0])


class Pipe:  # what a diffusers pipeline hands its callback_on_step_end
    num_timesteps = STEPS
    interrupt = False


TS = (999, 749, 499, 249)
CFG = [(t, label) for t in TS for label in (3, 0)]  # two calls (CFG branches) per step


def told_generation(fast, callback, steps=STEPS, pipe=Pipe):
    """The first ``steps`` steps of a CFG generation, each step's two calls followed by the callback."""
    outs = []
    for i, t in enumerate(TS[:steps]):
        outs += [call(fast, t, label) for label in (3, 0)]
        callback(pipe(), i, t, {})
    return outs


def test_a_run_without_the_callback_after_a_told_run_finds_its_steps(model, recwarn):
    """After a told generation the callback has told step 0; a run without it must not be taken for
    step 0's branches forever (every call computing and caching under a new branch)."""
    fast = ditopt.optimize(model, fora())
    told = told_generation(fast, ditopt.step_callback(fast))
    bare = [call(fast, t, label) for t, label in CFG]
    assert ditopt.stats(fast).decisions["transformer_blocks.0"] == ["compute", "compute", "reuse_residual",
                                                                    "reuse_residual", "compute", "compute",
                                                                    "reuse_residual", "reuse_residual"]
    for out, ref, same in zip(bare, fresh_run(model, fora(), CFG), told):
        assert torch.equal(out, ref) and torch.equal(out, same)
    assert not [w for w in recwarn if "ditopt" in str(w.message)]


def test_a_told_run_cut_short_then_a_run_without_the_callback_starts_afresh(model):
    fast = ditopt.optimize(model, fora(3))
    told_generation(fast, ditopt.step_callback(fast), steps=2)  # cut short after step 1: step 2 told
    with pytest.warns(RuntimeWarning, match="no step callback told the next step .a told run cut short"):
        outs = [call(fast, t, label) for t, label in CFG]
    # the first two calls were taken for the old generation's step 2 (unknowable without a host read);
    # the third, one more than a told step takes and at another timestep, starts a new generation
    # (the first call at its timestep: its CFG branches line up)
    for out, ref in zip(outs[2:], fresh_run(model, fora(3), CFG[2:8])):
        assert torch.equal(out, ref)


def test_a_step_callback_the_pipeline_never_calls_gives_way_to_the_timestep(model):
    """PixArtSigmaPipeline swallows callback_on_step_end in its **kwargs: made, never called, the
    callback had every later call taken for one more branch of step 0 (all computing)."""
    fast = ditopt.optimize(model, fora())
    ditopt.step_callback(fast)
    [call(fast, t, label) for t, label in CFG]  # 8 calls: taken for step 0's branches (UNTOLD_AFTER)
    with pytest.warns(RuntimeWarning, match="the step callback has not been called"):
        outs = [call(fast, t, label) for t, label in CFG]
    assert runtime_of(fast).state.told is None
    for out, ref in zip(outs[2:], fresh_run(model, fora(), CFG[2:])):  # a new generation from the move on
        assert torch.equal(out, ref)
    again = [call(fast, t, label) for t, label in CFG]
    for out, ref in zip(again, fresh_run(model, fora(), CFG)):
        assert torch.equal(out, ref)


# skip-layer guidance (SD3's skip_guidance_layers): step 0 one call, the later steps one more at their timestep
SLG = [[(TS[0], 3)]] + [[(t, 3), (t, 0)] for t in TS[1:]]


def test_a_told_step_with_more_calls_than_the_last_is_one_step_not_a_lost_teller(model):
    """A told step 0 of one call taught the runtime that steps take one call; step 1's second call
    (skip-layer guidance's extra pass, at the same timestep) was taken for a lost teller: a new
    generation, caches dropped, a false warning; and the next bare run started three generations."""
    fast = ditopt.optimize(model, fora())
    bare = [call(fast, t, label) for step in SLG for t, label in step]
    callback = ditopt.step_callback(fast)
    told = []
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i, step in enumerate(SLG):
            told += [call(fast, t, label) for t, label in step]
            callback(Pipe(), i, step[0][0], {})
        assert all(torch.equal(a, b) for a, b in zip(told, bare))
        again = [call(fast, t, label) for step in SLG for t, label in step]  # bare, after a told run
    assert all(torch.equal(a, b) for a, b in zip(again, bare))
    assert [(r.step, r.branch) for r in runtime_of(fast).records] == [(0, 0)] + [(s, b) for s in (1, 2, 3) for b in (0, 1)]


def test_a_told_model_first_called_at_a_later_step_reads_no_cache_of_the_last_generation(model):
    """Wan2.2's second expert: the pipeline tells every step, but calls it from step k on. Its first
    call, at a step the plan reuses, read the residual its last generation cached."""
    fast = ditopt.optimize(model, fora())
    callback = ditopt.step_callback(fast)
    for generation in range(2):
        outs = []
        for i, t in enumerate(TS):
            if i >= 1:  # called from step 1 on, which FORA-2 reuses
                outs += [call(fast, t, label) for label in (3, 0)]
            callback(Pipe(), i, t, {})
        assert ditopt.stats(fast).decisions["transformer_blocks.0"][:2] == ["compute", "compute"]
        ref = fresh_run(model, ditopt.presets.all_compute(steps=STEPS), CFG[2:4])
        assert torch.equal(outs[0], ref[0]) and torch.equal(outs[1], ref[1])


def test_a_callback_kept_from_a_run_cut_short_drops_the_caches(model):
    fast = ditopt.optimize(model, fora(3))
    callback = ditopt.step_callback(fast)
    told_generation(fast, callback, steps=2)  # cut short: step 2 told
    with pytest.warns(RuntimeWarning, match="finished step 0, but its calls were taken for step 2"):
        told_generation(fast, callback, steps=1)
    outs = [call(fast, t, label) for t, label in CFG[2:4]]  # step 1: reuse in the plan, but nothing cached
    assert ditopt.stats(fast).decisions["transformer_blocks.0"][-2:] == ["compute", "compute"]
    for out, ref in zip(outs, fresh_run(model, ditopt.presets.fora(interval=1, steps=STEPS), CFG[2:4])):
        assert torch.equal(out, ref)


def test_a_pipeline_running_another_step_count_than_the_plan_is_warned_at_its_first_step(model):
    class Longer(Pipe):
        num_timesteps = STEPS + 2

    fast = ditopt.optimize(model, fora())
    with pytest.warns(RuntimeWarning, match=r"runs 6 steps, but the plan was made for 4.*plan.resample\(6\)"):
        told_generation(fast, ditopt.step_callback(fast), steps=1, pipe=Longer)


def test_a_pipeline_interrupted_by_a_callback_ends_the_generation(model):
    class Interrupted(Pipe):
        interrupt = True

    fast = ditopt.optimize(model, fora())
    callback = ditopt.step_callback(fast)
    told_generation(fast, callback, steps=1, pipe=Interrupted)
    assert runtime_of(fast).state.told is None and ditopt.stats(fast).cache_bytes == 0
    outs = [call(fast, t, label) for t, label in CFG]  # a run without the callback: found from the timestep
    for out, ref in zip(outs, fresh_run(model, fora(), CFG)):
        assert torch.equal(out, ref)


# -- one runtime per wrapper ------------------------------------------------------------------------
def test_two_wrappers_of_one_model_keep_their_own_runtime(model):
    a = ditopt.optimize(model, fora(2))
    b = torch.compile(model, backend="ditopt", options={"plan": fora(3), "inductor": False}, fullgraph=True)
    c = torch.compile(model, backend="ditopt", options={"plan": fora(4), "inductor": False}, fullgraph=True)
    ts = (999, 749, 499, 249)
    solo = {k: fresh_run(model, fora(i), [(t, 3) for t in ts]) for k, i in (("a", 2), ("b", 3), ("c", 4))}
    outs = {"a": [], "b": [], "c": []}
    for t in ts:  # interleaved
        for name, m in (("a", a), ("b", b), ("c", c)):
            outs[name].append(call(m, t))
    for name in outs:
        for out, ref in zip(outs[name], solo[name]):
            assert torch.equal(out, ref), name
    assert len({id(runtime_of(m)) for m in (a, b, c)}) == 3
    assert ditopt.stats(b).decisions["transformer_blocks.0"] == ["compute", "reuse_residual", "reuse_residual",
                                                                 "compute"]


def test_the_original_model_has_no_runtime(model):
    ditopt.optimize(model, fora())
    for fn in (ditopt.reset, ditopt.stats):
        with pytest.raises(DitoptError, match="not an optimised model"):
            fn(model)


def test_two_models_of_one_class_compiled_with_equal_options_keep_their_own_runtimes():
    """dynamo keeps graphs on the class's forward and reuses one for a call whose backend compares
    equal; two torch.compile(backend="ditopt") calls with equal options compared equal, so the
    second model ran the first one's graph with the first one's caches (served turn by turn, each
    read the other's residuals)."""
    a, b = dit(seed=0), dit(seed=1)
    xb = torch.randn_like(X)
    ts_a, ts_b = TS, (999, 666, 333, 0)
    ca, cb = (torch.compile(m, backend="ditopt", options={"plan": fora(), "inductor": False}, fullgraph=True)
              for m in (a, b))
    outs_a, outs_b = [], []
    for i in range(STEPS):  # two requests served turn by turn
        outs_a.append(call(ca, ts_a[i]))
        outs_b.append(call(cb, ts_b[i], x=xb))
    fast_a, fast_b = ditopt.optimize(a, fora()), ditopt.optimize(b, fora())  # after: dynamo's cache as a user's
    assert all(torch.equal(out, call(fast_a, t)) for out, t in zip(outs_a, ts_a))
    assert all(torch.equal(out, call(fast_b, t, x=xb)) for out, t in zip(outs_b, ts_b))
    assert ditopt.stats(ca).calls == ditopt.stats(cb).calls == STEPS


def test_runtimes_are_released_with_their_wrapper():
    model = dit(layers=1, seed=5)
    fast = ditopt.optimize(model, fora())
    compiled = torch.compile(model, backend="ditopt", options={"plan": fora(), "inductor": False}, fullgraph=True)
    call(fast, 999), call(compiled, 999)
    ids = {runtime_of(fast).id, runtime_of(compiled).id}
    assert ids <= set(session._RUNTIMES)
    del fast, compiled
    gc.collect()
    assert not ids & set(session._RUNTIMES)


# -- threads ----------------------------------------------------------------------------------------
@torch.library.custom_op("ditopt_test::wait", mutates_args=())
def _wait(x: torch.Tensor) -> torch.Tensor:
    _GATE.entered.set()
    _GATE.release.wait(timeout=30)
    return x.clone()


@_wait.register_fake
def _(x):
    return torch.empty_like(x)


class _Gate:
    entered = threading.Event()
    release = threading.Event()


_GATE = _Gate()


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return x + torch.nn.functional.scaled_dot_product_attention(q, k, v)


class _Slow(torch.nn.Module):
    """Blocks inside its graph until released: a call in flight, deterministically."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Block() for _ in range(2))

    def forward(self, x, timestep):
        x = torch.ops.ditopt_test.wait(x) + 0 * timestep.reshape(-1, 1, 1)
        for block in self.blocks:
            x = block(x)
        return x


def test_a_second_thread_in_flight_is_refused_clearly():
    fast = ditopt.optimize(_Slow().eval(), ditopt.presets.fora(interval=2, steps=2, level="block"))
    x = torch.randn(1, 3, 8)
    _GATE.release.set()
    with torch.no_grad():
        fast(x, timestep=torch.tensor([1.0]))  # capture first
    _GATE.entered.clear(), _GATE.release.clear()
    errors = []
    worker = threading.Thread(target=lambda: fast(x, timestep=torch.tensor([2.0])))
    worker.start()
    assert _GATE.entered.wait(timeout=30)
    try:
        with torch.no_grad():
            fast(x, timestep=torch.tensor([3.0]))
    except ConcurrentCallError as exc:
        errors.append(exc)
    finally:
        _GATE.release.set()
        worker.join()
    assert len(errors) == 1 and "another thread" in str(errors[0])
    with torch.no_grad():  # the refused call changed nothing: the model still works
        fast(x, timestep=torch.tensor([4.0]))


def test_many_models_whose_first_call_is_in_a_worker_thread():
    """dynamo's recompile limit is per thread: the tenth optimised copy of a class still compiles."""
    failures = []

    def first_call(fast):
        try:
            call(fast, 999)
        except Exception as exc:  # noqa: BLE001 (reported below)
            failures.append(repr(exc))

    for i in range(10):
        fast = ditopt.optimize(dit(layers=1, seed=i), fora())
        worker = threading.Thread(target=first_call, args=(fast,))
        worker.start(), worker.join()
    assert failures == []


def test_concurrent_captures_leave_dynamo_unpatched():
    import time

    from torch._dynamo import symbolic_convert

    from ditopt.capture import source_names_skipped

    original = symbolic_convert.get_funcname

    def capture_for(seconds):
        with source_names_skipped():
            time.sleep(seconds)

    workers = [threading.Thread(target=capture_for, args=(s,)) for s in (0.2, 0.05, 0.3, 0.1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert symbolic_convert.get_funcname is original


# -- the step signal -------------------------------------------------------------------------------
def test_step_signal_is_the_timesteps_maximum():
    s = StepState()
    per_token = [torch.tensor([[0.0, t, t, t]]).max() for t in (999.0, 999.0, 500.0)]
    assert [s.observe(float(t))[:2] for t in per_token] == [(0, 0), (0, 1), (1, 0)]


def test_per_token_timesteps_advance_steps_and_keep_caches_bounded():
    """Wan2.2's image-to-video passes a 2-D timestep whose first latent frame is 0."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                  rope_max_seq_len=32).eval()
    x, text = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 3, 16)
    tokens = 2 * 2 * 2  # frames x (4/2) x (4/2)

    def timestep(t):
        ts = torch.full((1, tokens), float(t))
        ts[:, :4] = 0.0  # the first latent frame is the conditioning image
        return ts

    fast = ditopt.optimize(model, fora())
    sizes = []
    with torch.no_grad():
        for _ in range(3):
            for t in (999, 749, 499, 249):
                fast(x, timestep=timestep(t), encoder_hidden_states=text)
            sizes.append(ditopt.stats(fast).cache_bytes)
    assert ditopt.stats(fast).decisions["blocks.0"] == ["compute", "reuse_residual"] * 2
    assert sizes[0] == sizes[1] == sizes[2] > 0


# -- drop-in ---------------------------------------------------------------------------------------
def test_drop_in_bool_state_dict_deepcopy_pickle(model):
    from diffusers.utils.torch_utils import is_compiled_module

    fast = ditopt.optimize(model, fora())
    assert bool(fast) and is_compiled_module(fast) and fast._orig_mod is model
    state = fast.state_dict()
    assert list(state) == list(model.state_dict())
    other = dit(seed=7)
    other.load_state_dict(state)
    ref = [call(fast, t) for t in (999, 749)]
    for clone in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert type(clone) is type(fast) and runtime_of(clone) is not runtime_of(fast)
        assert all(torch.equal(call(clone, t), r) for t, r in zip((999, 749), ref))
    assert ditopt.stats(fast).calls == 2  # the copies did not touch the original's runtime


def test_load_state_dict_drops_the_caches_of_the_old_weights():
    model = dit(seed=2)
    fast = ditopt.optimize(model, fora())
    call(fast, 999)
    assert ditopt.stats(fast).cache_bytes > 0
    fast.load_state_dict(dit(seed=3).state_dict())
    assert ditopt.stats(fast).cache_bytes == 0
    assert torch.equal(call(fast, 749), call(dit(seed=3), 749))


@pytest.mark.parametrize("step", [1.5, -1, True, "2"])
def test_set_step_refuses_what_is_not_a_step(model, step):
    fast = ditopt.optimize(model, fora())
    with pytest.raises(ValueError, match="step must be an integer"):
        ditopt.set_step(fast, step)


def test_a_float_timestep_gives_the_models_own_error(model):
    fast = ditopt.optimize(model, fora())
    with pytest.raises(AttributeError, match="shape"), torch.no_grad():
        fast(X, timestep=999.0, class_labels=torch.tensor([3]))


# -- random call sequences against a reference of the semantics -------------------------------------
class Reference:
    """The semantics, written independently of the runtime: which calls form the generation each
    call belongs to. Samplers are taken to count down until shown otherwise. A generation starts at
    the first call, after ``reset``, after a call that raised, at ``set_step(0)``, when the timestep
    moves against the direction, and when a move along it leaves the schedule of the last full
    generation after following it for two steps or more. The third one-step generation in a row
    begun by a move against the direction (no reset, raise or ``set_step`` between) turns it: the
    three are one generation, and the model must give what a fresh one fed those calls gives."""

    def __init__(self):
        self.calls: list[tuple] = []  # this generation's (t, label, shape, override)
        self.ts: list[float] = []  # one timestep per step of this generation
        self.schedule: list[float] = []
        self.override = None
        self.rising = False  # the direction now
        self.began_rising = False  # the direction a fresh model replaying this generation starts with
        self.step = -1
        self.streak: list[list[tuple]] = []  # the calls of the one-step generations begun against it

    def _new(self, t=None):
        done = self.ts
        further = (lambda a, b: a <= b) if self.rising else (lambda a, b: a >= b)
        if done and not _segment(self.schedule, done) and (not self.schedule or further(done[0], self.schedule[0])):
            self.schedule = done
        self.calls, self.ts, self.step, self.began_rising = [], [], 0, self.rising

    def reset(self):
        self._new()
        self.override, self.step, self.streak = None, -1, []

    def set_step(self, step):
        self.override = step

    def call(self, t, label, shape):
        last = self.calls[-1][0] if self.calls else None
        override, self.override = self.override, None
        entry = (t, label, shape, override)
        if override is not None:
            self.streak = []
            if override == 0 or not self.calls:
                self._new()
            self.step = override
            self.ts.append(t)
            self.calls.append(entry)
            return list(self.calls)
        if last is not None and t == last:  # the next CFG branch
            self.calls.append(entry)
            if self.streak:
                self.streak[-1].append(entry)
            return list(self.calls)
        along = last is not None and (t > last) == self.rising
        if last is not None and along and not self._leaves(t):
            self.step, self.streak = self.step + 1, []
            self.ts.append(t)
            self.calls.append(entry)
            return list(self.calls)
        if last is not None and not along and self.step == 0:  # a one-step generation ends against it
            if not self.streak:
                self.streak = [list(self.calls)]
            self.streak.append([entry])
            if len(self.streak) == 3:  # the direction turns: the three are one generation
                self.calls = [c for gen in self.streak for c in gen]
                self.ts = [gen[0][0] for gen in self.streak]
                self.began_rising, self.rising, self.step, self.streak = self.rising, not self.rising, 2, []
                return list(self.calls)
        else:
            self.streak = []
        self._new()
        self.ts.append(t)
        self.calls.append(entry)
        return list(self.calls)

    def _leaves(self, t):
        last = self.calls[-1][0]
        if t == last or len(self.ts) < 2 or not self.ts or self.ts[0] not in self.schedule:
            return False
        start = self.schedule.index(self.ts[0])
        if self.schedule[start:start + len(self.ts)] != self.ts:
            return False
        nxt = start + len(self.ts)
        return nxt < len(self.schedule) and self.schedule[nxt] != t


def _segment(schedule, ts):
    if not ts or ts[0] not in schedule:
        return False
    start = schedule.index(ts[0])
    return schedule[start:start + len(ts)] == ts


SHAPES = {"small": (1, 4, 8, 8), "wide": (2, 4, 8, 8)}  # a batch of two is another graph
_INPUTS = {name: torch.randn(*shape, generator=torch.Generator().manual_seed(3)) for name, shape in SHAPES.items()}

SCHEDULE = [999, 833, 666, 499, 333, 166]

# Sampling loops (a run of the schedule, one or two CFG calls per step, maybe from a later start,
# maybe a step that raises inside the model and is retried) with what goes wrong between them: resets, set_step, a call that raises, a stray
# timestep, a batch of another size.
loops = st.tuples(st.just("loop"), st.integers(0, 3), st.integers(2, 6), st.booleans(),
                  st.sampled_from(["small", "small", "wide"]), st.none() | st.integers(0, 5))
disturbances = st.one_of(
    st.none(),
    st.tuples(st.just("call"), st.sampled_from(SCHEDULE + [60]), st.sampled_from([3, 0, 50]),
              st.sampled_from(["small", "wide"])),
    st.tuples(st.just("reset")),
    st.tuples(st.just("set_step"), st.integers(0, 5)),
)
segments = st.tuples(disturbances, loops).map(lambda pair: [e for e in pair if e is not None])


def expand(plan):
    for segment in (e for pair in plan for e in pair):
        if segment[0] == "loop":
            _, start, n, cfg, shape, fail_at = segment
            for i, t in enumerate(SCHEDULE[start:start + n]):
                if i == fail_at:  # the model raises inside, the caller retries the step
                    yield ("call", t, 50, shape)
                for label in ((3, 0) if cfg else (3,)):
                    yield ("call", t, label, shape)
        else:
            yield segment


@pytest.fixture(scope="module")
def pair():
    model = dit(layers=2, seed=11)
    plan = ditopt.presets.taylorseer(interval=2, order=1, steps=len(SCHEDULE))
    return model, plan, ditopt.optimize(model, plan), ditopt.optimize(model, plan)


def _run(fast, t, label, shape):
    with torch.no_grad():
        x = _INPUTS[shape]
        return fast(x, timestep=torch.tensor([t] * len(x)), class_labels=torch.tensor([label] * len(x))).sample


@settings(max_examples=int(os.environ.get("DITOPT_HYPOTHESIS_EXAMPLES", 40)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segments=st.lists(segments, min_size=1, max_size=4))
@example(segments=[[("loop", 0, 6, True, "small", None)], [("loop", 0, 3, True, "small", None)],
                   [("loop", 4, 2, True, "small", None)]])  # interrupted, restarted off the schedule
@example(segments=[[("loop", 0, 4, True, "small", 2)]])  # a step that raises and is retried
@example(segments=[[("loop", 5, 2, False, "small", None)], [("call", 333, 3, "small")],
                   [("loop", 3, 3, True, "small", None)]])  # three rises in a row: a sampler counting up
@example(segments=[[("loop", 5, 2, False, "small", None)], [("call", 333, 50, "small")],
                   [("call", 333, 3, "small")], [("loop", 0, 6, False, "small", None)]])  # a raise ends the streak
def test_random_call_sequences_match_a_fresh_run(pair, segments):
    model, plan, fast, fresh = pair
    ditopt.reset(fast)
    runtime_of(fast).state = StepState()  # as if just optimised
    ref = Reference()
    reused = 0
    for event in expand(segments):
        if event[0] == "reset":
            ditopt.reset(fast), ref.reset()
        elif event[0] == "set_step":
            ditopt.set_step(fast, event[1]), ref.set_step(event[1])
        else:
            _, t, label, shape = event
            generation = ref.call(t, label, shape)
            if label == 50:  # out of the embedding's range: the model raises, the generation ends
                with pytest.raises(IndexError):
                    _run(fast, t, label, shape)
                ref.reset()
                continue
            out = _run(fast, t, label, shape)
            # a fresh model fed this generation's calls
            ditopt.reset(fresh)
            runtime_of(fresh).state = StepState(rising=ref.began_rising)
            for t_, label_, shape_, override in generation:
                if override is not None:
                    ditopt.set_step(fresh, override)
                expected = _run(fresh, t_, label_, shape_)
            assert torch.equal(out, expected), (event, generation)
            reused += any(d[-1] != "compute" for d in ditopt.stats(fast).decisions.values())
    note(f"calls that reused or forecast: {reused}")


def test_half_precision_timesteps_that_round_to_one_value_are_two_steps():
    """HunyuanVideo's, Flux's and Qwen-Image's pipelines hand the model their timestep in the latents'
    bfloat16, where 50 steps of a shifted schedule give 1000, 996, 996, 992: the second 996 was taken
    for a CFG branch, the generation counted 49 steps and the plan ran shifted by one from there."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ditopt.small_models import MODELS

    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, 51)[:-1])
    half = [t.to(torch.bfloat16) for t in scheduler.timesteps]
    assert len({float(t) for t in half}) < len(half)  # the case: some steps share a bfloat16 timestep
    model, kwargs = MODELS["hunyuan"]()
    fast = ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=len(half), level="block"))
    x, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
    with torch.no_grad():
        for t in half:  # CFG as two calls per step, the latents moving as a sampler moves them
            cond, uncond = (fast(**{**kwargs, "hidden_states": x, "timestep": t.expand(1), "encoder_hidden_states": e}
                                 ).sample for e in (text, torch.zeros_like(text)))
            x = x - 0.02 * (uncond + 4 * (cond - uncond))
    records = runtime_of(fast).records
    assert [(r.step, r.branch) for r in records] == [(i, b) for i in range(len(half)) for b in (0, 1)]


def test_a_warm_up_call_at_the_loops_first_timestep_is_warned_of(model):
    """A call on dummy inputs before the sampling loop, at its first timestep, is taken for one of
    step 0's CFG branches (no timestep tells it apart), and step 1 reads what it cached: warned."""
    fast = ditopt.optimize(model, fora())
    call(fast, TS[0], x=torch.zeros_like(X))  # the warm-up
    with pytest.warns(RuntimeWarning, match="step 0 took 3 calls and step 1 2: a call before the sampling loop"):
        [call(fast, t, label) for t, label in CFG[:5]]
    ditopt.reset(fast)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        [call(fast, t, label) for t, label in CFG]  # the loop alone: no warning


def test_calls_at_one_timestep_keep_the_caches_bounded(model):
    """A loop timing one input called the model at one timestep: every call was one more CFG branch
    of step 0, with its own caches, for the life of the model."""
    fast = ditopt.optimize(model, fora())
    with pytest.warns(RuntimeWarning, match="16 calls in a row at one timestep"):
        outs, sizes = [], []
        for _ in range(40):
            outs.append(call(fast, TS[0]))
            sizes.append(ditopt.stats(fast).cache_bytes)
    assert runtime_of(fast).state.branch < 16 and max(sizes[16:]) <= max(sizes[:16])
    assert all(torch.equal(out, outs[0]) for out in outs)  # each computes, as step 0 does
