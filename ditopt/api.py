"""The public functions: ``optimize``, ``stats``, ``reset``, ``set_plan``, ``set_step``, ``sites``.

``optimize`` wraps a model in dynamo with a :class:`~ditopt.backend.DitoptBackend` that runs
the rewritten graph eagerly; ``torch.compile(model, backend="ditopt", ...)`` reaches the same
backend with inductor below. The other functions read or steer the model's
:class:`~ditopt.runtime.Runtime`. Profiling has its own entry point (:func:`ditopt.profile`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import warnings
import weakref
from dataclasses import dataclass, field, replace

import torch
from torch._dynamo.eval_frame import OptimizedModule

from ditopt.runtime import Runtime

from .backend import (CompiledGraph, DitoptBackend, PlanLike, arguments_from, as_plan, backend_of, compile_wrapper_of,
                      runtime_of_compile_call)
from .capture import first_line, lean_tracing, make_room_for_another_model, refuse_under_dispatch_mode, where_in_model
from .block_watch import recheck_blocks
from .regional import RegionalError, hold_marks, refuse_marks, release_marks
from .errors import CaptureError, DitoptError, InputError, PlanError, TimestepNotFound
from .sites import OUTPUT, STACK, SiteTable, find_sites


def canonical_strides(x):
    """A contiguous tensor with the strides ``contiguous()`` gives (a view, no copy), else ``x``.

    A dimension of size 1 may have any stride in a contiguous tensor, and dynamo guards on it:
    a pipeline whose latents change layout there after its first step (WanPipeline at one frame:
    its noise and the scheduler's output differ in the frame dimension's stride) would capture
    the model a second time, and the second graph finds no cache of the first to reuse.

    Example:
        >>> x = torch.zeros(2, 3, 1, 4).permute(0, 2, 1, 3)   # (2, 1, 3, 4), contiguous, stride 4 at dim 1
        >>> x.stride(), canonical_strides(x).stride()
        ((12, 4, 4, 1), (12, 12, 4, 1))
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_contiguous():
        return x
    want = tuple(math.prod(max(n, 1) for n in x.shape[i + 1:]) for i in range(x.dim()))
    return x if x.stride() == want else x.as_strided(x.shape, want)


class DitoptModule(OptimizedModule):
    """What ``optimize()`` returns: dynamo's wrapper, so that a pipeline sees the original
    module's attributes, ``config``, ``dtype`` and ``device`` (and diffusers' ``is_compiled_module``
    / ``_orig_mod`` unwrapping works), that reports plan errors unwrapped, answers ``bool`` like
    a module, has the model's own ``state_dict`` keys, and deep-copies and pickles as a fresh
    optimised copy (its own runtime, no caches)."""

    def __call__(self, *args, **kwargs):
        state = self._ditopt_runtime.state
        try:
            began, out = state.generation, self._call(*args, **kwargs)
            if state.generation != began and self.__dict__.get("_ditopt_marks") and recheck_blocks(self._orig_mod):
                self._ditopt_runtime.end_generation()  # a block changed in place since it was traced (an
                out = self._call(*args, **kwargs)  # adapter's scale set between generations): trace it again
            return out
        except BaseException:  # also one that failed before the runtime saw it (a capture of a new shape)
            self._ditopt_runtime.end_generation()  # the next call starts afresh: no shifted CFG branch
            raise

    def _call(self, *args, **kwargs):
        refuse_under_dispatch_mode()
        make_room_for_another_model()  # dynamo's config is per thread: a worker thread has its own
        args, kwargs = self._timestep_by_keyword(args, kwargs)
        args, kwargs = tuple(map(canonical_strides, args)), {k: canonical_strides(v) for k, v in kwargs.items()}
        try:
            if self._ditopt_runtime.graphs:
                return super().__call__(*args, **kwargs)
            with lean_tracing():  # the first call captures the model
                return super().__call__(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            inner = getattr(exc, "inner_exception", None)
            held = self.__dict__.get("_ditopt_marks")
            if isinstance(inner, RegionalError) and held:  # blocks ditopt marked itself: capture them inline
                refuse_marks(held)
                object.__setattr__(self, "_ditopt_regional_failure", str(inner))
                return self(*args, **kwargs)
            if isinstance(inner, CaptureError):
                self._raise_for_timestep(args, kwargs, inner)
            if isinstance(inner, DitoptError):
                raise inner from None
            raise
        except torch._dynamo.exc.TorchDynamoException as exc:  # dynamo could not trace the model
            held = self.__dict__.get("_ditopt_marks")
            if held:  # perhaps because of the blocks ditopt marked itself: capture them inline
                refuse_marks(held)
                object.__setattr__(self, "_ditopt_regional_failure", f"{type(exc).__name__}: {exc}")
                return self(*args, **kwargs)
            self._raise_for_timestep(args, kwargs)
            # inputs the model itself refuses (a dtype, a shape, a timestep it asserts on) raise the
            # model's own error, not a capture error: run it eagerly once, on this failure path only
            try:
                self._orig_mod(*args, **kwargs)
            except Exception as own:
                raise own from None  # dynamo's failure to trace it is not the news
            if not self._ditopt_runtime.graphs and not self.__dict__.get("_ditopt_warmed"):
                # state some models build lazily on their first call (Z-Image's rotary table, under a
                # torch.device context dynamo cannot trace): the eager call built it, capture again
                object.__setattr__(self, "_ditopt_warmed", True)
                return self(*args, **kwargs)
            name = type(self._orig_mod).__name__
            first = first_line(exc)
            raise CaptureError(f"could not capture {name} as one graph: dynamo raised {type(exc).__name__}: "
                               f"{first}{where_in_model(exc)}") from exc

    def _timestep_by_keyword(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A timestep given by position goes by keyword (with the arguments after it), so that the
        graph names it also where ``forward`` is wrapped in a ``(*args, **kwargs)`` decorator
        (Z-Image's pipeline calls ``transformer(x, t, cap_feats)``)."""
        names = self.__dict__.get("_ditopt_after_timestep", False)
        if names is False:
            names = arguments_from(self._orig_mod.forward, self._ditopt_backend.timestep_arg)
            object.__setattr__(self, "_ditopt_after_timestep", names)
        if names is None or not names[0] < len(args) <= names[0] + len(names[1]) \
                or set(names[1][:len(args) - names[0]]) & set(kwargs):
            return args, kwargs
        moved = dict(zip(names[1], args[names[0]:]))
        return args[:names[0]], {**moved, **kwargs}

    def _raise_for_timestep(self, args, kwargs, error: Exception | None = None) -> None:
        """A timestep not a tensor (the model's own error, else ours), or one the model never reads."""
        name = self._ditopt_backend.timestep_arg
        try:
            given = inspect.signature(self._orig_mod.forward).bind_partial(*args, **kwargs).arguments.get(name)
        except TypeError:
            return
        if isinstance(given, torch.Tensor) and isinstance(error, TimestepNotFound):
            raise CaptureError(f"{type(self._orig_mod).__name__} does not use its '{name}' input (no operation of "
                               f"its forward reads it): ditopt finds the step from it, and cannot cache this model")
        if given is None or isinstance(given, torch.Tensor):
            return
        self._orig_mod(*args, **kwargs)  # raises the model's own error, if it has one
        raise CaptureError(f"'{name}' is a {type(given).__name__} ({given!r}); ditopt reads the denoising step from "
                           f"a tensor: pass torch.tensor([{given!r}])")

    def __bool__(self) -> bool:
        return True

    def state_dict(self, *args, **kwargs):
        """The model's own ``state_dict`` (no ``_orig_mod.`` prefix): it loads into the model class."""
        return self._orig_mod.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, *args, **kwargs):
        """Load into the model; the caches (features of the old weights) are dropped."""
        result = self._orig_mod.load_state_dict(state_dict, *args, **kwargs)
        self._ditopt_runtime.reset()
        return result

    def __deepcopy__(self, memo):
        backend = self._ditopt_backend
        return optimize(copy.deepcopy(self._orig_mod, memo), backend.plan, timestep_arg=backend.timestep_arg,
                        coalesce=backend.coalesce, parallel=backend.parallel,
                        attention_backend=backend.attention_backend, regional=self._ditopt_regional)

    def __reduce__(self):
        backend = self._ditopt_backend
        return _rebuild, (self._orig_mod, backend.plan.to_yaml(), backend.timestep_arg, backend.coalesce,
                          backend.parallel, backend.attention_backend, self._ditopt_regional)


def _rebuild(model: torch.nn.Module, plan_text: str, timestep_arg: str, coalesce: bool,
             parallel=None, attention_backend: str = "sdpa", regional: bool = True) -> torch.nn.Module:
    """Unpickle an optimised model: optimise the unpickled model again with the same plan (and the
    same :class:`ditopt.SequenceParallel`, whose group is then the unpickling process's default)."""
    from .plan import Plan

    return optimize(model, Plan.from_yaml(plan_text), timestep_arg=timestep_arg, coalesce=coalesce,
                    parallel=parallel, attention_backend=attention_backend, regional=regional)


def candidate_site_names(model: torch.nn.Module) -> list[str]:
    """Module paths a plan may name, known before capture (the graph decides the rest)."""
    return [STACK, OUTPUT, *(name for name, _ in model.named_modules() if name)]


def optimize(model: torch.nn.Module, plan: PlanLike, *, timestep_arg: str = "timestep",
             coalesce: bool = True, parallel=None, regional: bool = True,
             attention_backend: str = "sdpa") -> torch.nn.Module:
    """Make ``model`` reuse features as ``plan`` says; a drop-in replacement for the model.

    The plan is checked at once against the model's module paths (a plan for another model,
    unknown sites, bad steps fail here, naming rule and site); the graph is captured on the
    first call, where the plan is resolved against the sites found in it. Adjacent sites that
    decide alike share one region and one cache (exact; ``coalesce=False`` keeps one per site).
    ``parallel=ditopt.SequenceParallel(mode="ulysses" | "ring")``, under an initialised process
    group, shards the token dimension over its ranks (every rank calls the model with the same
    inputs and gets the whole output; ``stats(model).comm_bytes`` counts what it sent).
    ``attention_backend`` moves SDPA calls to another kernel: ``"flash"`` (flash-attn),
    ``"sage"`` (SageAttention), ``"flex"`` (torch's flex_attention), ``"auto"`` (flash-attn where
    it applies, else SDPA, said once); ``"sdpa"`` (the default) keeps them. An unknown name, or a
    named kernel whose package does not import, raises InputError here, the model untouched.
    ``regional`` (default on): the model's repeated blocks (:func:`ditopt.mark_repeated_blocks`
    finds them) are traced once per kind of block and called per block, so the first call costs
    about one block's tracing, not one per block; they are marked while the optimised model
    lives (a mark is invisible outside ditopt's capture), and a model whose blocks cannot be
    traced alone is captured whole.

    Example:
        >>> import torch, ditopt
        >>> from diffusers import DiTTransformer2DModel
        >>> model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
        ...     out_channels=4, num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
        >>> fast = ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=4))
        >>> x, y = torch.randn(1, 4, 8, 8), torch.tensor([3])
        >>> with torch.no_grad():
        ...     for t in (999, 700, 400, 100):
        ...         _ = fast(x, timestep=torch.tensor([t]), class_labels=y)
        >>> ditopt.stats(fast).decisions["transformer_blocks.1.attn1"]
        ['compute', 'reuse', 'compute', 'reuse']
    """
    return wrap(model, plan, timestep_arg=timestep_arg, coalesce=coalesce, parallel=parallel, regional=regional,
                attention_backend=attention_backend)


def wrap(model: torch.nn.Module, plan: PlanLike, *, timestep_arg: str = "timestep", observe: bool = False,
         runtime: Runtime | None = None, coalesce: bool = True, parallel=None, regional: bool = True,
         attention_backend: str = "sdpa") -> torch.nn.Module:
    """What :func:`optimize` does; ``observe`` and ``runtime`` are for the profiler's entry point."""
    if isinstance(model, DitoptModule):
        raise DitoptError("optimize() takes the original model, not one it optimised already; to change the plan "
                          "of this one, ditopt.set_plan(fast, plan)")
    if isinstance(model, OptimizedModule):
        raise DitoptError("optimize() takes the original model, not a torch.compile'd one")
    if not isinstance(model, torch.nn.Module):
        hint = " (for a pipeline, pass pipe.transformer)" if hasattr(model, "components") else ""
        raise DitoptError(f"optimize() takes a torch.nn.Module, got {type(model).__name__}{hint}")
    plan = as_plan(plan)
    if plan.model and plan.model != type(model).__name__:
        raise PlanError(f"plan was made for {plan.model}, not {type(model).__name__}")
    plan.check_patterns(candidate_site_names(model))
    runtime = runtime or Runtime()
    backend = DitoptBackend(plan, runtime, inductor=False, timestep_arg=timestep_arg, observe=observe,
                            coalesce=coalesce, parallel=parallel, attention_backend=attention_backend)
    make_room_for_another_model()
    wrapped = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    wrapped.__class__ = DitoptModule
    object.__setattr__(wrapped, "_ditopt_runtime", runtime)
    object.__setattr__(wrapped, "_ditopt_backend", backend)
    held = hold_marks(model) if regional else []
    object.__setattr__(wrapped, "_ditopt_marks", held)
    object.__setattr__(wrapped, "_ditopt_regional", regional)
    # torch.compile(wrapped) unwraps this to find what to trace: make it refuse, not trace the bare model
    object.__setattr__(wrapped, "_torchdynamo_orig_callable", _refuse_compiling_again)
    if held:
        weakref.finalize(wrapped, release_marks, held)
    return wrapped


def _refuse_compiling_again(*args, **kwargs):
    """What ``torch.compile(fast)`` of an optimised model traces: dynamo would otherwise trace the
    bare model's ``forward`` under its own backend and silently drop the plan."""
    raise DitoptError("this model was returned by ditopt.optimize() and runs its own rewritten graph; torch.compile "
                      "cannot compile it again: compile the original model with torch.compile(model, "
                      "backend='ditopt', options={'plan': plan}) for inductor, or call the optimised model as it is")


def runtime_of(model: torch.nn.Module) -> Runtime:
    """The runtime of a model returned by :func:`optimize`, or by ``torch.compile(...,
    backend="ditopt")`` (each such wrapper has its own; the original model has none)."""
    if not isinstance(model, torch.nn.Module):
        raise DitoptError(f"expected a model returned by ditopt.optimize() or torch.compile(..., backend='ditopt'), "
                          f"got {type(model).__name__}")
    rt = model.__dict__.get("_ditopt_runtime")
    if rt is not None:
        return rt
    wrapper = compile_wrapper_of(model) if isinstance(model, OptimizedModule) else None
    if wrapper is not None and getattr(wrapper, "compiler_name", None) == "ditopt":
        return runtime_of_compile_call(wrapper, model)
    name = type(model._orig_mod if isinstance(model, OptimizedModule) else model).__name__
    raise DitoptError(f"this {name} is not an optimised model: pass the module that ditopt.optimize() or "
                      f"torch.compile(..., backend='ditopt') returned, not the original")


def compiled_graph(model: torch.nn.Module) -> CompiledGraph:
    """The latest graph compiled for ``model`` (optimised, or ``torch.compile``'d with the ditopt
    backend): the captured and rewritten graphs, the sites and the decision table."""
    runtime = runtime_of(model)  # an error naming what was passed, for anything but an optimised model
    backend = model.__dict__.get("_ditopt_backend") or backend_of(runtime)
    if backend is None or backend.last is None:
        raise DitoptError("the model has not been called yet: nothing has been compiled")
    return backend.last


@dataclass
class Stats:
    """What the runtime did in the last generation.

    ``decisions[site]`` has one entry per call: compute, reuse, reuse_residual or skipped.
    ``comm_bytes``: bytes this rank sent to other ranks in the generation (sequence parallelism),
    by collective kind (``all_to_all``, ``all_gather``, ``ring``) and ``total``; empty when
    nothing was sent. Counted as the collectives run (eagerly: not under torch.compile).
    """

    decisions: dict[str, list[str]]
    cache_bytes: int
    step: int
    generation: int
    calls: int
    graphs: int
    comm_bytes: dict[str, int] = field(default_factory=dict)


def stats(model: torch.nn.Module) -> Stats:
    rt = runtime_of(model)
    return Stats(decisions=rt.decisions(), cache_bytes=rt.store.nbytes, step=rt.state.step,
                 generation=rt.state.generation, calls=len(rt.records), graphs=len(rt.graphs),
                 comm_bytes=dict(rt.comm_bytes))


def set_plan(model: torch.nn.Module, plan: PlanLike) -> None:
    """Give an optimised model another static plan without recompiling.

    The rewritten graph holds a skip branch and cache nodes for every site its plan addresses;
    which way each branch goes at each step is a table in the runtime. A plan that addresses the
    same sites, with the same cache slots and no ``when`` rules, needs only a new table: this
    swaps it and resets the caches. Anything else raises :class:`PlanError` and leaves the model
    as it was (optimise again for a plan of another shape).

    Example:
        >>> import torch, ditopt
        >>> from diffusers import DiTTransformer2DModel
        >>> model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
        ...     out_channels=4, num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
        >>> fast = ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=4))
        >>> x, y = torch.randn(1, 4, 8, 8), torch.tensor([3])
        >>> def generate():
        ...     ditopt.reset(fast)
        ...     with torch.no_grad():
        ...         for t in (999, 700, 400, 100):
        ...             _ = fast(x, timestep=torch.tensor([t]), class_labels=y)
        >>> generate()
        >>> ditopt.set_plan(fast, ditopt.presets.fora(interval=3, steps=4))
        >>> generate(); ditopt.stats(fast).decisions["transformer_blocks.1.attn1"]
        ['compute', 'reuse', 'reuse', 'compute']
    """
    backend = model.__dict__.get("_ditopt_backend")
    if backend is None:
        raise DitoptError("set_plan() takes a model returned by ditopt.optimize()")
    plan = as_plan(plan)
    rt = runtime_of(model)
    if not rt.graphs or backend.last is None:
        raise DitoptError("the model has not been called yet: there is no compiled graph to re-plan")
    table = plan.compile(backend.last.sites)
    runs = {}
    if backend.coalesce:  # the graph's regions must be the ones this plan would get
        from ditopt.passes.coalesce_regions import table_runs

        graph = backend.last.original.graph
        runs = table_runs(table, backend.last.sites, {n.name: {u.name for u in n.users} for n in graph.nodes})
    for old in rt.graphs.values():
        why = old.incompatibility(table)
        if why is None and old.runs != runs:
            why = ("the compiled graph coalesces other runs of sites than this plan would (their outputs would "
                   "differ in rounding from optimize(plan)); optimise again")
        if why is not None:
            raise PlanError(why)
    for graph, old in list(rt.graphs.items()):
        rt.set_graph(graph, replace(table, runs=dict(old.runs)))
    backend.plan = plan
    rt.reset()


def reset(model: torch.nn.Module) -> None:
    """Forget caches and step state: the next call starts a new generation. ``model`` is what
    :func:`optimize` or ``torch.compile(..., backend="ditopt")`` returned (the original model
    has no state: passing it is an error). A block whose attributes changed in place since it
    was traced (an attention processor set, an adapter's scale) is traced again at the next call."""
    runtime_of(model).reset()
    recheck_blocks(model._orig_mod if isinstance(model, OptimizedModule) else model)


@contextlib.contextmanager
def generation(model: torch.nn.Module):
    """Run one generation explicitly: the first call inside starts a new generation at step 0
    whatever its timestep (an image-to-image run after an interrupted one, a restart at a lower
    timestep), and leaving the block (normally or by an exception) ends it: its caches are freed
    and the next call starts a new generation. ``stats`` still reports it afterwards. Inside,
    steps are inferred from the timestep unless told (:func:`step_callback`, :func:`set_step`).

    Example:
        >>> import torch, ditopt
        >>> from diffusers import DiTTransformer2DModel
        >>> model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
        ...     out_channels=4, num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
        >>> fast = ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=4))
        >>> x, y = torch.randn(1, 4, 8, 8), torch.tensor([3])
        >>> with torch.no_grad():
        ...     for ts in ((999, 700, 400), (250, 100)):  # interrupted, then a restart lower down
        ...         with ditopt.generation(fast):
        ...             for t in ts:
        ...                 _ = fast(x, timestep=torch.tensor([t]), class_labels=y)
        >>> ditopt.stats(fast).decisions["transformer_blocks.1.attn1"], ditopt.stats(fast).cache_bytes
        (['compute', 'reuse'], 0)
    """
    runtime = runtime_of(model)
    runtime.end_generation()
    recheck_blocks(model._orig_mod if isinstance(model, OptimizedModule) else model)
    try:
        yield model
    finally:
        runtime.end_generation()


def set_step(model: torch.nn.Module, step: int, branch: int = 0) -> None:
    """Tell the runtime which step (and CFG branch) the next call is, overriding detection
    (step 0, branch 0 starts a new generation)."""
    runtime_of(model).state.set(step, branch)


def step_callback(model: torch.nn.Module, steps: int | None = None):
    """A diffusers ``callback_on_step_end`` that tells ``model``'s runtime each denoising step, so
    that no call reads the timestep on the host (on a GPU: no device-to-host copy per call).

    Made before a generation, it tells the runtime that the next calls are step 0; after step
    ``i``, that they are step ``i + 1`` (its CFG branches in call order); after the pipeline's
    last step (``pipe.num_timesteps``), step 0 of the next generation. (A ``torch.compile``'d
    model has no runtime before its first call: its first step is inferred from the timestep.)
    A generation cut short should be followed by :func:`reset`; what is caught without one: a call
    that raises inside the model ends the generation; a pipeline stopped by its ``interrupt`` flag
    (set by a callback that runs before this one, as in ``MultiPipelineCallbacks([yours, this])``)
    ends it here; a step the pipeline reports other than the one told (a callback kept from a run
    cut short) drops the caches, with a warning; and calls after the told ones (a run without the
    callback after a told run, or a pipeline that never calls it) are found from the timestep again
    (:mod:`ditopt.runtime.step_state`). Pipelines with the older ``callback(i, t, latents)``
    (``callback_steps=1``) are served too; give them ``steps``.

    Example::

        fast = ditopt.optimize(pipe.transformer, plan)
        pipe.transformer = fast
        image = pipe(prompt, callback_on_step_end=ditopt.step_callback(fast)).images[0]
    """
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise InputError(f"steps must be an integer >= 1 (the pipeline's step count), got {steps!r}")
    runtime_of(model).state.tell(0)  # the original model, or one compiled with another backend: an error now

    def callback(*args):
        if len(args) == 4:  # callback_on_step_end(pipe, i, t, callback_kwargs)
            pipe, i, _, callback_kwargs = args
            total = getattr(pipe, "num_timesteps", None) or steps
        else:  # callback(i, t, latents)
            (i, _, _), callback_kwargs, total, pipe = args, None, steps, None
        runtime = runtime_of(model)
        if getattr(pipe, "interrupt", False):  # the pipeline stops here: the next call starts afresh
            runtime.end_generation()
            return callback_kwargs
        plans = {table.steps for table in runtime.graphs.values()} if i == 0 and total is not None else set()
        if plans and plans != {total}:
            warnings.warn(f"ditopt: the pipeline runs {total} steps, but the plan was made for {min(plans)}; its "
                          f"schedule does not fit this run: make it for {total} (plan.resample({total}), or "
                          f"plan_from_profile(..., steps={total}))", RuntimeWarning, stacklevel=2)
        if runtime.state.told not in (None, i):
            warnings.warn(f"ditopt: the pipeline finished step {i}, but its calls were taken for step "
                          f"{runtime.state.told} (a step callback kept from a run cut short?); its caches are "
                          f"dropped. Call ditopt.reset after a generation cut short", RuntimeWarning, stacklevel=2)
            runtime.end_generation()
        runtime.state.tell(0 if total is not None and i + 1 >= total else i + 1)
        return callback_kwargs

    callback.tensor_inputs = []  # what diffusers' MultiPipelineCallbacks asks each of its callbacks
    return callback


def sites(model: torch.nn.Module, *args, **example_inputs) -> SiteTable:
    """The sites of ``model``, found in the graph captured from one call with these inputs.

    Example:
        >>> import torch, ditopt
        >>> from diffusers import DiTTransformer2DModel
        >>> model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
        ...     out_channels=4, num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
        >>> table = ditopt.sites(model, hidden_states=torch.randn(1, 4, 8, 8), timestep=torch.tensor([1]),
        ...                      class_labels=torch.tensor([1]))
        >>> [(s.name, s.kind) for s in table][:3]
        [('output', 'output'), ('stack', 'stack'), ('transformer_blocks.0', 'block')]
    """
    from .capture import capture

    if isinstance(model, OptimizedModule):
        model = model._orig_mod
    cap = capture(model, *args, **example_inputs)
    table = find_sites(cap.gm.graph)
    table.model = type(model).__name__
    return table


__all__ = ["DitoptModule", "Stats", "compiled_graph", "generation", "optimize", "reset", "runtime_of", "set_plan", "set_step",
           "sites", "stats", "step_callback", "wrap"]
