"""Call sequences and bad inputs a new user tries: each gives the right result or a clear error that
names the offending thing, and leaves the user's model untouched.

Found by a sweep over call sequences (torch.compile of an optimised model, a non-module given to
optimize, calibration runs that never call the model or change its input shape, bench arguments
that fail only after the work).
"""

from __future__ import annotations

import copy

import pytest
import torch

import ditopt
from ditopt.errors import DitoptError
from ditopt.profile import ProfileError
from synthetic import Attention, FeedForward, Stack

STEPS = 4
TIMESTEPS = (999, 749, 499, 249)


def dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()


def call(model, t, batch=1):
    x = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(x, timestep=torch.tensor([t] * batch), class_labels=torch.tensor([3] * batch)).sample


@pytest.fixture(scope="module")
def model():
    return dit()


def fora():
    return ditopt.presets.fora(interval=2, steps=STEPS, level="block")


def assert_follows_its_plan(model, fast):
    """A new generation of ``fast`` reuses at FORA's steps and equals a fresh optimised copy."""
    ditopt.reset(fast)
    outs = [call(fast, t) for t in TIMESTEPS]
    assert ditopt.stats(fast).decisions["transformer_blocks.0"] == ["compute", "reuse_residual"] * 2
    fresh = ditopt.optimize(model, fora())
    for out, t in zip(outs, TIMESTEPS):
        assert torch.equal(out, call(fresh, t))


# -- torch.compile of what optimize returned ---------------------------------------------------------
@pytest.mark.parametrize("options", [dict(backend="eager"), dict(), dict(backend="eager", fullgraph=True)])
def test_torch_compile_of_an_optimized_model_refuses_instead_of_dropping_the_plan(model, options):
    """torch.compile(fast) used to trace the bare model's forward under its own backend: the plan was
    silently gone (every step computed, stats empty). Now it says what to do instead (under
    fullgraph=True dynamo reports our error inside its own)."""
    fast = ditopt.optimize(model, fora())
    compiled = torch.compile(fast, **options)
    error = Exception if options.get("fullgraph") else DitoptError
    with pytest.raises(error, match=r"ditopt.optimize\(\).*backend='ditopt'"):
        call(compiled, TIMESTEPS[0])
    assert_follows_its_plan(model, fast)  # the optimised model itself is unharmed


# -- inputs the model itself refuses --------------------------------------------------------------------
def _refusals():
    x = torch.randn(1, 4, 8, 8)
    labels = torch.tensor([3])
    return {"half-precision input": dict(hidden_states=x.half(), timestep=torch.tensor([999]), class_labels=labels),
            "0-d timestep": dict(hidden_states=x, timestep=torch.tensor(999), class_labels=labels),
            "3 channels for 4": dict(hidden_states=x[:, :3], timestep=torch.tensor([999]), class_labels=labels)}


@pytest.mark.parametrize("captured_before", [False, True], ids=["first call", "after a capture"])
def test_inputs_the_model_refuses_raise_its_own_error_not_a_capture_error(model, captured_before):
    """A wrong dtype, shape or timestep used to surface as "could not capture ... as one graph"
    (dynamo fails on it first) from the second such call on, or whenever a graph existed: a user
    hunted a tracing problem that was their input. Now the model's own error comes through,
    whatever came before, and the optimised model still follows its plan afterwards."""
    fast = ditopt.optimize(model, fora())
    if captured_before:
        call(fast, TIMESTEPS[0])
    for label, inputs in _refusals().items():
        with pytest.raises(Exception) as own:
            model(**inputs)
        with pytest.raises(type(own.value)) as ours:
            with torch.no_grad():
                fast(**inputs)
        assert str(ours.value) == str(own.value), label
        assert ours.value.__cause__ is None and ours.value.__suppress_context__, label
    assert_follows_its_plan(model, fast)


def test_optimize_refuses_what_is_not_a_module(model):
    class Pipeline:  # what a diffusers pipeline looks like here: not a module, has components
        components = {"transformer": model}

    with pytest.raises(DitoptError, match="torch.nn.Module, got NoneType"):
        ditopt.optimize(None, fora())
    with pytest.raises(DitoptError, match=r"got Pipeline \(for a pipeline, pass pipe.transformer\)"):
        ditopt.optimize(Pipeline(), fora())
    with pytest.raises(DitoptError, match="got function"):
        ditopt.optimize(lambda x: x, fora())


# -- profile: calibration runs that cannot give a map -------------------------------------------------
def test_profile_of_a_run_that_never_calls_the_model_says_so(model):
    with pytest.raises(ProfileError, match="never called the transformer"):
        ditopt.profile(model, lambda transformer: None, steps=STEPS, progress=False)


@pytest.mark.parametrize("batches", [(2, 1), (1, 2)], ids=["shrinks", "grows"])
def test_profile_of_a_run_that_changes_the_input_shape_is_a_profile_error(model, batches):
    """The recorder subsamples each site's output at fixed positions chosen at its first call: a
    smaller output raised a raw IndexError, a larger one silently compared other elements."""
    def run(transformer):
        for i, t in enumerate(TIMESTEPS):
            call(transformer, t, batch=batches[i % 2])

    with pytest.raises(ProfileError, match=r"shape .* at step 1.*one input shape"):
        ditopt.profile(model, run, steps=STEPS, progress=False)
    # the same run at one shape profiles
    rmap = ditopt.profile(model, lambda tr: [call(tr, t, batch=2) for t in TIMESTEPS], steps=STEPS, progress=False)
    assert rmap.steps == STEPS


# -- the bench command line: arguments checked before the work ----------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["bench", "--device", "nosuchdevice"], "not a torch device: 'nosuchdevice'"),
    (["bench", "--device", "cpu:x"], "not a torch device: 'cpu:x'"),
    (["bench", "--device", "cpu", "--steps", "0"], "--steps"),
    (["bench", "--device", "cpu", "--json", "/nonexistent-dir/rows.json"], "/nonexistent-dir does not exist"),
    (["bench", "--markdown", "/nonexistent-dir/bench.md"], "/nonexistent-dir does not exist"),
    (["bench", "--seeds", "0"], "--seeds"),
    (["bench", "--device", "cpu", "--shape", "tiny", "--variants", "nosuch"], "unknown variant(s) ['nosuch']"),
])
def test_bench_arguments_are_checked_before_any_work(argv, message, monkeypatch, capsys):
    import ditopt.bench.cli
    import ditopt.bench.gpu
    from ditopt.cli import main

    def started(*args, **kwargs):
        raise AssertionError("the benchmark started before its arguments were checked")

    monkeypatch.setattr(ditopt.bench.cli, "run_bench", started)
    if "--variants" not in argv:  # that one is checked by gpu.run itself, before any work
        monkeypatch.setattr(ditopt.bench.gpu, "run", started)
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_on_a_device_this_machine_lacks_is_a_usage_error(monkeypatch, capsys):
    import ditopt.bench.gpu
    from ditopt.cli import main

    monkeypatch.setattr(ditopt.bench.gpu, "run", lambda *a, **k: pytest.fail("the benchmark started"))
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--device", "cuda"])
    assert exit_.value.code == 2 and "no cuda device" in capsys.readouterr().err


# -- a block that broadcasts one stream's batch ------------------------------------------------------
class _BroadcastBlock(torch.nn.Module):
    """Text tokens given once for a batch of images (FluxPipeline with num_images_per_prompt=2 and
    prompt_embeds of one prompt): the block returns the text stream at the images' batch, so the
    first block's text live-out has no input shaped like it."""

    def __init__(self, dim: int):
        super().__init__()
        self.attn, self.ff = Attention(dim), FeedForward(dim)
        self.text = torch.nn.Linear(dim, dim)

    def forward(self, x, context, temb):
        x = x + self.attn(x + temb[:, None] + context.mean(1, keepdim=True))
        x = x + self.ff(x)
        return x, context + self.text(x.mean(1, keepdim=True))


class _BroadcastStack(torch.nn.Module):
    def __init__(self, depth: int = 3, dim: int = 8):
        super().__init__()
        self.t_embed = torch.nn.Linear(1, dim)
        self.blocks = torch.nn.ModuleList(_BroadcastBlock(dim) for _ in range(depth))
        self.proj_out = torch.nn.Linear(dim, dim)

    def forward(self, x, context, timestep):
        temb = self.t_embed(timestep[:, None] / 1000)
        for block in self.blocks:
            x, context = block(x, context, temb)
        return self.proj_out(x)


def test_reuse_residual_caches_the_output_of_a_stream_the_block_broadcasts():
    """reuse_residual on a block whose text live-out is batch 2 and its text input batch 1: that
    live-out caches its output, the image stream its residual (it was a PlanError: "needs an
    input shaped like each output")."""
    torch.manual_seed(0)
    model = _BroadcastStack().eval()
    x, context = torch.randn(2, 5, 8), torch.randn(1, 3, 8)
    ts = [torch.full((2,), t) for t in (900.0, 700.0, 500.0, 300.0)]
    plan = ditopt.Plan.from_dict({"version": 1, "steps": 4, "rules": [
        {"sites": "blocks.*", "kind": "block", "action": "reuse_residual", "steps": [1, 3]}]})
    fast = ditopt.optimize(model, plan)
    with torch.no_grad():
        outs = [fast(x + i, context, timestep=t) for i, t in enumerate(ts)]
    assert ditopt.stats(fast).decisions["blocks.0"] == ["compute", "reuse_residual"] * 2
    # the reference, by hand: each block's image residual and text output of the last computed step
    cache = {}
    with torch.no_grad():
        for step, t in enumerate(ts):
            h, c = x + step, context
            temb = model.t_embed(t[:, None] / 1000)
            for i, block in enumerate(model.blocks):
                if step % 2 == 0:
                    h_out, c_out = block(h, c, temb)
                    cache[i] = (h_out - h, c_out - c if c.shape == c_out.shape else None, c_out)
                else:
                    dh, dc, c_old = cache[i]
                    h_out, c_out = h + dh, (c + dc if dc is not None else c_old)
                h, c = h_out, c_out
            assert torch.allclose(outs[step], model.proj_out(h), atol=1e-6), step


# -- the model changed after it was optimised --------------------------------------------------------
def _swap_a_linear(model):  # what PEFT's LoRA injection does: a module in a block replaced by another
    old = model.transformer_blocks[0].ff.net[2]
    new = torch.nn.Linear(old.in_features, old.out_features)
    torch.nn.init.normal_(new.weight, std=0.5)
    model.transformer_blocks[0].ff.net[2] = new
    return old  # kept alive, as a LoRA layer keeps its base layer


def _add_a_weight(model):  # a parameter where there was none (an affine norm)
    norm = model.transformer_blocks[1].norm3
    norm.weight = torch.nn.Parameter(torch.full((norm.normalized_shape[0],), 3.0))


class _Doubled:  # an attention processor set in place of the model's: a plain attribute, not a module
    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return 2 * self.inner(attn, hidden_states, *args, **kwargs)


def _set_a_processor(model):
    attn = model.transformer_blocks[0].attn1
    attn.set_processor(_Doubled(attn.processor))


def _optimized(model, how):
    if how == "compiled, blocks marked":
        ditopt.mark_repeated_blocks(model)
        return torch.compile(model, backend="ditopt", options={"plan": fora(), "inductor": False}, fullgraph=True)
    return ditopt.optimize(model, fora(), regional=how == "blocks traced once")


@pytest.mark.parametrize("how", ["blocks traced once", "captured whole", "compiled, blocks marked"])
@pytest.mark.parametrize("change", [_swap_a_linear, _add_a_weight, _set_a_processor],
                         ids=["module swapped", "weight added", "processor set"])
def test_a_block_changed_after_a_capture_is_captured_again(change, how):
    """Dynamo does not trace into a block ditopt traces once and calls per block, so it could not
    see a submodule swapped in after the capture (a LoRA adapter loaded into an optimised
    pipeline): the graph ran the block as it was, silently. Now the change gives the block a new
    key that dynamo guards on: the next call captures again and matches a model optimised after
    the change. A module or parameter registered is seen at once; an attribute set in place (a
    processor) at the next ``ditopt.reset`` or ``ditopt.generation``, which compare each block
    with what was traced."""
    model = dit()
    fast = _optimized(model, how)
    before = [call(fast, t) for t in TIMESTEPS]
    kept = change(model)
    ditopt.reset(fast)
    after = [call(fast, t) for t in TIMESTEPS]
    assert not torch.equal(after[0], before[0])
    fresh = ditopt.optimize(copy.deepcopy(model), fora(), regional=how != "captured whole")
    for out, t in zip(after, TIMESTEPS):
        assert torch.equal(out, call(fresh, t))
    assert ditopt.stats(fast).decisions["transformer_blocks.0"] == ["compute", "reuse_residual"] * 2
    del kept


class _Gain:  # an attention processor with a setting the user changes in place (an adapter's scale)
    def __init__(self, inner):
        self.inner, self.gain = inner, 1.0

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return self.gain * self.inner(attn, hidden_states, *args, **kwargs)


def test_an_attribute_changed_in_place_between_generations_is_seen_without_a_reset():
    """Under regional capture (the default) a setting changed in place inside a block between two
    generations (``pipe.set_ip_adapter_scale``, a LoRA's scale) was seen only after an explicit
    ``ditopt.reset``: the next generation, begun by its timestep alone, ran the block as traced,
    silently. Each call that begins a generation now compares the blocks with what was traced,
    and a changed block is traced again before that call's output is returned."""
    model = dit()
    for block in model.transformer_blocks:
        block.attn1.set_processor(_Gain(block.attn1.processor))
    fast = ditopt.optimize(model, fora())
    before = [call(fast, t) for t in TIMESTEPS]
    for block in model.transformer_blocks:
        block.attn1.processor.gain = 0.5
    after = [call(fast, t) for t in TIMESTEPS]  # no reset: a new generation by its timestep
    assert not torch.equal(after[0], before[0])
    fresh = ditopt.optimize(copy.deepcopy(model), fora())
    for out, t in zip(after, TIMESTEPS):
        assert torch.equal(out, call(fresh, t))
    assert ditopt.stats(fast).decisions["transformer_blocks.0"] == ["compute", "reuse_residual"] * 2


def test_the_sites_of_many_models_in_one_process(monkeypatch):
    """Each capture adds an entry to dynamo's cache of the model's forward (and of wrappers many
    diffusers classes share), and dynamo refuses a ninth under fullgraph=True: listing the sites
    of a ninth model in one process was a CaptureError (only optimize raised the limit)."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    monkeypatch.setattr(torch._dynamo.config, "accumulated_recompile_limit", 256)
    x = dict(hidden_states=torch.randn(1, 4, 8, 8), timestep=torch.tensor([500]), class_labels=torch.tensor([1]))
    tables = [ditopt.sites(dit(), **x) for _ in range(10)]
    assert all(t.names() == tables[0].names() for t in tables) and "transformer_blocks.1" in tables[0]


class _SigmaNet(torch.nn.Module):  # a model whose timestep argument is called sigma
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Linear(1, 16)
        self.blocks = torch.nn.ModuleList([Attention(16), FeedForward(16)])

    def forward(self, x, sigma):
        x = x + self.emb(sigma[:, None])[:, None]
        for block in self.blocks:
            x = block(x)
        return x


def test_a_timestep_under_another_name_is_refused_listing_the_inputs():
    """The model calls its timestep ``sigma``: the error says which tensor inputs there are, so
    that ``timestep_arg=`` is one look away; with it, the plan runs."""
    x, sigma = torch.randn(2, 8, 16), torch.tensor([1.0, 1.0])
    fast = ditopt.optimize(_SigmaNet().eval(), fora())
    with pytest.raises(ditopt.CaptureError, match=r"no 'timestep' tensor input found \(the model's tensor inputs: "
                                                  r"(sigma, x|x, sigma)\).*timestep_arg="):
        fast(x, sigma)
    fast = ditopt.optimize(_SigmaNet().eval(), ditopt.presets.all_compute(steps=STEPS), timestep_arg="sigma")
    with torch.no_grad():
        assert fast(x, sigma).shape == x.shape


def _kandinsky6():
    from diffusers import Kandinsky6Transformer3DModel

    torch.manual_seed(0)
    model = Kandinsky6Transformer3DModel(in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8,
                                         time_dim=16, model_dim=32, ff_dim=64, num_text_blocks=1,
                                         num_visual_blocks=2, axes_dims=(4, 6, 6), visual_cond=False, in_audio_dim=4,
                                         out_audio_dim=4, model_dim_a=32, time_dim_a=16, ff_dim_a=64,
                                         axes_dims_a=(16,)).eval()
    return model, dict(hidden_states=torch.randn(1, 2, 8, 8, 4), encoder_hidden_states=torch.randn(1, 6, 16),
                       pooled_projections=torch.randn(1, 8), return_dict=False)


@pytest.mark.parametrize("preset", ["taylorseer", "fora", "fbcache"])
def test_a_block_whose_output_nothing_reads_is_no_site(preset):
    """Kandinsky 6 called without audio still runs its audio blocks, and nothing reads what they
    return. They were sites with no outputs: every block-level plan failed (an IndexError inside
    a pass, or a PlanError advising ``reuse``, which failed the same way). A region nothing reads
    is now no site; the plan applies to the rest and the output equals the bare model's where it
    computes."""
    model, kwargs = _kandinsky6()
    assert not any(name.startswith("audio_") for name in ditopt.sites(model, timestep=torch.tensor([1000.0]),
                                                                      **kwargs).names())
    plan = {"taylorseer": lambda: ditopt.presets.taylorseer(steps=4, interval=2, order=1),
            "fora": lambda: ditopt.presets.fora(interval=2, steps=4, level="block"),
            "fbcache": lambda: ditopt.presets.first_block_cache(0.08, steps=4)}[preset]()
    fast = ditopt.optimize(model, plan)
    with torch.no_grad():
        for i, t in enumerate((1000.0, 750.0, 500.0, 250.0)):
            out = fast(timestep=torch.tensor([t]), **kwargs)[0]
            if i == 0:
                assert torch.equal(out, model(timestep=torch.tensor([t]), **kwargs)[0])
    if preset == "fora":
        assert ditopt.stats(fast).decisions["visual_transformer_blocks.1"] == ["compute", "reuse_residual"] * 2


def test_blocks_iterated_through_a_sliced_module_list_keep_their_names():
    """Motif-Video iterates ``single_transformer_blocks[:n - k]``: slicing a ModuleList registers its
    modules on a new list, and dynamo traced ditopt's global registration hook, so those blocks were
    named by a path through ditopt's own table (``list(dict.keys(G.__import_ditopt...``). A block
    plan then skipped them silently (and so did every later capture in the process), a plan
    naming them matched no site, and ``profile`` failed."""
    from diffusers import MotifVideoTransformer3DModel

    torch.manual_seed(0)
    model = MotifVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                         num_layers=1, num_single_layers=1, patch_size=2, text_embed_dim=16,
                                         rope_axes_dim=(4, 6, 6)).eval()
    kwargs = dict(hidden_states=torch.randn(1, 4, 2, 8, 8), encoder_hidden_states=torch.randn(1, 6, 16),
                  encoder_attention_mask=torch.ones(1, 6), return_dict=False)
    fast = ditopt.optimize(model, fora())
    with torch.no_grad():
        for t in TIMESTEPS:
            fast(timestep=torch.tensor([float(t)]), **kwargs)
    decisions = ditopt.stats(fast).decisions
    assert decisions["single_transformer_blocks.0"] == ["compute", "reuse_residual"] * 2
    assert not any("import" in name for name in decisions)


def test_sites_of_a_fresh_model_that_builds_state_on_its_first_call():
    """BriaFibo2 builds its rotary table on its first call under a ``torch.device`` context that
    dynamo cannot trace: ``optimize`` captured it after one eager call, but ``ditopt.sites`` (and
    the command line) refused a fresh model. ``capture`` itself now tries again after that call."""
    from diffusers import BriaFibo2Transformer2DModel

    torch.manual_seed(0)
    model = BriaFibo2Transformer2DModel(in_channels=4, patch_size=2, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
                                        cap_feat_dim=16, injection_layer_ids=(1,), perceiver_num_layers=1,
                                        min_num_gist_tokens=4, max_num_gist_tokens=8, gist_step=4, gist_min_text_len=4,
                                        gist_max_text_len=16, axes_dims=(4, 6, 6), axes_lens=(64, 32, 32)).eval()
    table = ditopt.sites(model, hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 2, 6, 16),
                         timestep=torch.tensor([1.0]))
    assert "stack" in table.names() and "noise_refiner.0" in table.names()


class _IgnoresItsTimestep(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Attention(16), FeedForward(16)])

    def forward(self, x, timestep):  # accepted, never read (DreamLite with norm_type="layer_norm")
        for block in self.blocks:
            x = block(x)
        return x


def test_a_model_that_never_reads_its_timestep_is_refused_saying_so():
    """The timestep was given as a tensor, but the model does not use it, so dynamo leaves it out of
    the graph: the error told the user to pass a tensor, which they had."""
    fast = ditopt.optimize(_IgnoresItsTimestep(), ditopt.presets.fora(interval=2, steps=4))
    with pytest.raises(ditopt.CaptureError, match="_IgnoresItsTimestep does not use its 'timestep' input"):
        with torch.no_grad():
            fast(torch.randn(1, 8, 16), timestep=torch.tensor([999.0]))


class _BrokenAtABlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Linear(1, 16)
        self.blocks = torch.nn.ModuleList([Attention(16) for _ in range(4)])

    def forward(self, x, timestep):
        x = x + self.emb(timestep[:, None].float())[:, None]
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == 1:
                torch._dynamo.graph_break()  # a .tolist() in an MoE router, a print
        return x


def test_a_model_split_at_a_graph_break_under_torch_compile_names_fullgraph():
    """NucleusMoE's router reads a count on the host: without ``fullgraph=True`` dynamo hands the
    backend pieces of the model, and the error was "pattern '*' matches no site; sites are e.g.
    []" even for an all-compute plan. It now says what happened and how to see where."""
    torch._dynamo.reset()
    compiled = torch.compile(_BrokenAtABlock().eval(), backend="ditopt", dynamic=False,
                             options={"plan": ditopt.presets.all_compute(steps=4), "inductor": False})
    with pytest.raises(Exception, match=r"graph break.*fullgraph=True\) names the break"):
        with torch.no_grad():
            compiled(torch.randn(1, 8, 16), timestep=torch.tensor([999.0]))


@pytest.mark.slow
def test_blocks_whose_attention_calls_flex_attention_with_a_score_mod_compile_with_skips():
    """AnyFlowFAR's blocks call flex_attention with a score_mod and a mask_fn, which dynamo keeps
    as submodules of the graph: the skip branch passed them to ``torch.cond`` as operands, which
    must be tensors, and a block plan failed under inductor (the eager path lowers the cond before
    it is checked). The branch now reads them itself."""
    from diffusers import AnyFlowFARTransformer3DModel

    torch.manual_seed(0)
    model = AnyFlowFARTransformer3DModel(patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4), num_attention_heads=2,
                                         attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
                                         freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
                                         chunk_partition=(1, 1)).eval()
    kwargs = dict(hidden_states=torch.randn(2, 2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 6, 16),
                  chunk_partition=[1, 1], return_dict=False)
    eager = ditopt.optimize(model, fora())
    compiled = torch.compile(model, backend="ditopt", options={"plan": fora()}, dynamic=False)
    with torch.no_grad():
        for i in range(STEPS):
            t = torch.full((2, 2), 1000.0 * (1 - i / STEPS))
            want = eager(timestep=t, r_timestep=0.8 * t, **kwargs)[0]
            assert (compiled(timestep=t, r_timestep=0.8 * t, **kwargs)[0] - want).abs().max() < 1e-4
    assert ditopt.stats(compiled).decisions["blocks.0"] == ["compute", "reuse_residual"] * 2


def test_a_block_whose_input_broadcasts_to_the_batch_reuses_its_output_under_a_block_preset():
    """Kandinsky 5's pipeline at two videos a prompt keeps the text at batch 1, and its text block's
    output is batch 2 (the time embedding broadcasts): the block has no input shaped like its
    output, and FORA's block preset (reuse_residual on every block) was refused. A pattern that
    reaches such a site now reuses its output there, with a warning; naming it is still refused."""
    torch.manual_seed(0)
    model = Stack(depth=2, dim=16).eval()
    x = torch.randn(1, 8, 16)  # one sample, broadcast against a batch of two timesteps
    fast = ditopt.optimize(model, fora())
    with pytest.warns(RuntimeWarning, match="site 'blocks.0' has no input shaped like its output"):
        with torch.no_grad():
            outs = [fast(x, timestep=torch.tensor([t, t])) for t in TIMESTEPS]
    decisions = ditopt.stats(fast).decisions
    assert decisions["blocks.0"] == ["compute", "reuse"] * 2 and decisions["blocks.1"] == ["compute", "reuse_residual"] * 2
    with torch.no_grad():
        assert torch.equal(outs[0], model(x, torch.tensor([999, 999])))
    named = ditopt.Plan.from_yaml("version: 1\nsteps: 4\nrules: [{sites: blocks.0, action: reuse_residual, steps: [1]}]")
    with pytest.raises(ditopt.PlanError, match="reuse_residual needs an input shaped like an output"):
        with torch.no_grad():
            ditopt.optimize(model, named)(x, timestep=torch.tensor([999, 999]))


def test_calling_an_optimised_model_under_flop_counter_mode_says_what_to_do(model):
    """A user counting what a plan saves entered FlopCounterMode around the optimised model: torch
    raised "torch.compile with fullgraph=True found no compiled frames" (dynamo runs nothing
    compiled under a dispatch mode). It is now a DitoptError that says where to count instead."""
    from torch.utils.flop_counter import FlopCounterMode

    fast = ditopt.optimize(model, fora())
    call(fast, TIMESTEPS[0])  # captured and run outside the mode
    with pytest.raises(DitoptError, match="cannot run under FlopCounterMode.*graph_flops"):
        with FlopCounterMode(display=False):
            call(fast, TIMESTEPS[1])
    # refused before dynamo saw the call: it did not mark the frame skipped for good
    assert torch.equal(call(fast, TIMESTEPS[0]), call(ditopt.optimize(model, fora()), TIMESTEPS[0]))
    from ditopt.flops import graph_flops

    with graph_flops(ditopt.compiled_graph(fast).rewritten) as per_call:  # what the error points to
        call(fast, TIMESTEPS[1])
    assert len(per_call) == 1 and per_call[0] > 0
