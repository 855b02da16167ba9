"""A cost model: each site's FLOPs and cache bytes as sympy expressions of batch and sequence.

A plan's saving depends on the resolution: attention grows with the square of the token count,
linear layers with the token count, so reusing attention saves a larger share of a block at a
larger size. :func:`cost_model` captures the model once with *symbolic* shapes and writes, for
every site ``ditopt.sites`` finds, its FLOPs per call and the bytes its cache holds as
expressions in

- ``B``: the batch (dim 0 of ``hidden_states``);
- ``S``: the tokens of the main stream after patchify (``frames * h * w / patch``), read from
  the token dimension of the first block's output;
- ``L``: the text tokens (dim 1 of ``encoder_hidden_states``), when the model lets it vary;
- any other input dimension that stays free, named ``<input>_<dim>``.

The hidden size is a number from the model's config (parameters fix it), reported as
``CostModel.hidden``; it is not a free symbol.

How the expressions are obtained (no per-model table): dynamo captures the model with
``dynamic=True`` and duck shaping off, so every tensor in ``node.meta["example_value"]`` has
SymInt sizes whose ``.node.expr`` is a sympy expression in dynamo's own symbols
(``s28`` = ``hidden_states.size()[0]``, ...). FLOPs are counted per node from the op and these
shapes with :func:`ditopt.flops.node_flops`, FlopCounterMode's formulas written for sympy sizes
(matmul-like ops, attention and convolution; elementwise ops, norms and softmax count 0).

A node's FLOPs go to every site whose nodes contain it: the node to site membership is the one
:func:`ditopt.sites.find_sites` computes, run on the symbolic graph. The token dimension
``S_expr`` (e.g. ``s22*(s18//2)*(s42//2)`` for a video model) is then replaced by ``S`` by
substituting one of its factors. A model whose code branches on a size (CogVideoX's positional
embedding depends on frames, height and width) has that size fixed by dynamo at capture; the
expression then has no ``S`` and asking for another ``S`` raises an error.

Dynamo fixes sizes 0 and 1 at capture, so an example batch of 1 is repeated to 2 (every tensor
input whose dim 0 is 1) before the symbolic capture.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import sympy
import torch
import torch.fx as fx

from ditopt.runtime.decisions import RUNNING, SLOTS, Action, DecisionTable, keeps_residual

from .capture import capture
from .errors import CaptureError
from .flops import attention_calls, node_flops, node_shape, window_attention_flops
from .plan import Plan
from .sites import SiteTable, find_sites

B, S, L = sympy.symbols("B S L", integer=True, positive=True)
_SIZE_SOURCE = re.compile(r"\['(\w+)'\]\.size\(\)\[(\d+)\]$")
_HIDDEN = "hidden_states"
_TEXT = "encoder_hidden_states"


# -- symbolic capture ----------------------------------------------------------------------------

@dataclass
class SymbolicCapture:
    """A graph captured with symbolic shapes, and what its symbols stand for."""

    gm: fx.GraphModule
    shape_env: Any
    sizes: dict[tuple[str, int], sympy.Expr]  # (input name, dim) -> expression in dynamo's symbols
    values: dict[sympy.Symbol, int]  # dynamo symbol -> its value at capture

    def expr(self, size) -> sympy.Expr:
        if isinstance(size, torch.SymInt):
            return self.shape_env.replace(size.node.expr)
        return sympy.Integer(int(size))


def _batch_of_two(inputs: dict[str, Any]) -> dict[str, Any]:
    """Dynamo fixes a size of 1; repeat a batch of 1 to 2 so the batch stays a symbol."""
    hidden = inputs.get(_HIDDEN)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() == 0 or hidden.shape[0] != 1:
        return inputs
    return {k: v.repeat(2, *[1] * (v.dim() - 1)) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 1 else v
            for k, v in inputs.items()}


def capture_symbolic(model: torch.nn.Module, **inputs) -> SymbolicCapture:
    """Capture ``model(**inputs)`` as one graph whose tensor sizes are sympy expressions
    (:func:`ditopt.capture.capture` with symbolic shapes), and read what its symbols stand for.

    Example:
        >>> cap = capture_symbolic(torch.nn.Linear(4, 3), input=torch.randn(5, 4))
        >>> cap.sizes[("input", 0)].free_symbols == {cap.sizes[("input", 0)]}   # dim 0 is a symbol
        True
        >>> cap.sizes[("input", 1)]                                            # fixed by the weight
        4
    """
    from torch._guards import detect_fake_mode

    gm = capture(model, symbolic_shapes=True, **inputs).gm
    fake_mode = detect_fake_mode([n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"])
    shape_env = fake_mode.shape_env
    backed = getattr(shape_env, "backed_var_to_val", None) or shape_env.var_to_val
    sizes: dict[tuple[str, int], sympy.Expr] = {}
    for symbol, sources in shape_env.var_to_sources.items():
        for source in sources:
            m = _SIZE_SOURCE.search(source.name)
            if m:
                sizes.setdefault((m.group(1), int(m.group(2))), shape_env.replace(symbol))
    values = {s: int(v) for s, v in backed.items() if isinstance(s, sympy.Symbol) and str(s).startswith("s")}
    return SymbolicCapture(gm, shape_env, sizes, values)


# -- the model ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SiteCost:
    """One site's cost: FLOPs per call, and bytes of its output and residual caches."""

    name: str
    kind: str
    flops: sympy.Expr
    output_bytes: sympy.Expr
    residual_bytes: sympy.Expr | None  # None when no input is shaped like each output
    watch_bytes: sympy.Expr = sympy.Integer(0)  # its first live-out, which a ``when`` indicator keeps
    attention: tuple[tuple[tuple[sympy.Expr, ...], tuple[sympy.Expr, ...]], ...] = ()  # (q, v) shapes of its SDPA calls
    window_bytes: sympy.Expr = sympy.Integer(0)  # its SDPA outputs: the residuals a ``window`` plan caches


@dataclass(frozen=True)
class Prediction:
    """What a plan costs over one generation.

    ``compute_fraction``: executed block FLOPs / the block FLOPs of an all-compute run;
    ``block_flops``: executed block FLOPs, summed over all calls; ``cache_bytes_peak``: bytes
    the cache store holds once every reusing site has stored (CFG branches cached apart).
    """

    compute_fraction: float
    block_flops: int
    cache_bytes_peak: int
    total_block_flops: int = 0


class CostModel:
    """FLOPs and cache bytes of every site as sympy expressions; build it with :func:`cost_model`.

    ``dims`` maps each free symbol's name to its value at capture (``{"B": 2, "S": 16}``);
    keyword arguments of :meth:`flops`, :meth:`cache_bytes` and :meth:`predict` override them.
    """

    def __init__(self, sites: SiteTable, costs: dict[str, SiteCost], dims: dict[str, int],
                 symbols: dict[str, sympy.Symbol], hidden: int | None,
                 definitions: dict[str, sympy.Expr] | None = None,
                 input_sizes: dict[tuple[str, int], sympy.Expr] | None = None,
                 users: dict[str, set[str]] | None = None):
        self.sites = sites
        self.users = users  # node -> the names of its users: which runs of sites coalesce (None: none)
        self.costs = costs
        self.dims = dict(dims)
        self.symbols = dict(symbols)
        self.hidden = hidden
        self.definitions = dict(definitions or {})  # each dim in dynamo's symbols for the input sizes
        self._input_sizes = dict(input_sizes or {})

    # -- lookups ---------------------------------------------------------------------------------
    def _cost(self, site: str) -> SiteCost:
        if site not in self.costs:
            raise KeyError(f"unknown site {site!r}; sites are e.g. {list(self.costs)[:6]}")
        return self.costs[site]

    def expr(self, site: str, what: str = "flops") -> sympy.Expr:
        """The sympy expression of ``site``'s ``flops`` (per call), ``output_bytes`` or ``residual_bytes``."""
        cost = self._cost(site)
        if what not in ("flops", "output_bytes", "residual_bytes"):
            raise ValueError(f"what must be flops, output_bytes or residual_bytes, got {what!r}")
        value = getattr(cost, what)
        if value is None:
            raise ValueError(f"site {site!r} has no residual cache: no input is shaped like its outputs")
        return value

    def _values(self, dims: Mapping[str, int]) -> dict[sympy.Symbol, int]:
        unknown = set(dims) - set(self.symbols)
        if unknown:
            fixed = sorted(unknown & {"B", "S", "L"})
            why = f" ({', '.join(fixed)} fixed at capture: the model's code branches on it)" if fixed else ""
            raise ValueError(f"unknown dim(s) {sorted(unknown)}{why}; this model's dims are {sorted(self.symbols)}")
        merged = {**self.dims, **dims}
        for name, value in merged.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"dim {name} must be a positive int, got {value!r}")
        return {self.symbols[k]: sympy.Integer(v) for k, v in merged.items()}

    def evaluate(self, expr: sympy.Expr, **dims) -> int:
        """``expr`` at the capture dims, overridden by ``dims``."""
        value = sympy.sympify(expr.xreplace(self._values(dims)))
        if value.free_symbols:
            raise ValueError(f"missing dim(s) {sorted(map(str, value.free_symbols))} to evaluate {expr}")
        return int(value)

    def flops(self, site: str, **dims) -> int:
        """FLOPs of one call of ``site``."""
        return self.evaluate(self.expr(site), **dims)

    def cache_bytes(self, site: str, slot: str = "output", **dims) -> int:
        """Bytes a cache of ``site``'s ``output`` (its live-outs) or ``residual`` holds, per CFG branch."""
        if slot not in ("output", "residual", SLOTS[Action.SHARE_CFG], "partial"):  # share_cfg: an offset, output-sized
            raise ValueError(f"slot must be 'output' or 'residual', got {slot!r}")  # partial: its input not counted
        return self.evaluate(self.expr(site, f"{slot if slot in ('output', 'residual') else 'output'}_bytes"), **dims)

    def at(self, **dims) -> "CostModel":
        """The same model with other default dims (another resolution, frame count or batch)."""
        self._values(dims)
        return CostModel(self.sites, self.costs, {**self.dims, **dims}, self.symbols, self.hidden,
                         self.definitions, self._input_sizes, self.users)

    def dims_for(self, **inputs) -> dict[str, int]:
        """The dims of a call with these inputs (tensors or shapes), e.g. ``hidden_states`` at 32x32.

        Every dim must follow from the inputs given; pass the model's keyword inputs. Example:
        ``cost.dims_for(hidden_states=(2, 4, 32, 32))`` gives ``{"B": 2, "S": 256}`` for DiT.
        """
        raw: dict[sympy.Symbol, sympy.Integer] = {}
        for (name, dim), size_expr in self._input_sizes.items():
            if name not in inputs or inputs[name] is None or not hasattr(inputs[name], "__len__"):
                continue
            shape = tuple(inputs[name].shape) if isinstance(inputs[name], torch.Tensor) else tuple(inputs[name])
            if dim >= len(shape):
                raise ValueError(f"{name} has {len(shape)} dims; the model was captured with at least {dim + 1}")
            if isinstance(size_expr, sympy.Symbol):
                raw.setdefault(size_expr, sympy.Integer(shape[dim]))
            elif size_expr.is_number and int(size_expr) != shape[dim]:
                raise ValueError(f"{name} dim {dim} was fixed at {int(size_expr)} when the model was captured "
                                 f"(its code branches on that size); got {shape[dim]}")
        out = {}
        for name, definition in self.definitions.items():
            value = sympy.sympify(definition.xreplace(raw))
            if value.free_symbols:
                needs = sorted({n for (n, _), e in self._input_sizes.items() if e in value.free_symbols})
                raise ValueError(f"dim {name} needs input(s) {needs}; got {sorted(inputs)}")
            out[name] = int(value)
        return out

    # -- plans -------------------------------------------------------------------------------------
    def block_sites(self) -> list[str]:
        """The outermost blocks: the sites whose FLOPs a compute fraction counts."""
        out = []
        for s in self.sites:
            if s.kind == "block" and not any(self.sites[a].kind == "block" for a in self.sites.ancestors(s.name)):
                out.append(s.name)
        return out

    def predict(self, plan: Plan | DecisionTable | None = None, steps_calls: int | Sequence[int] | None = None, *,
                decisions: Mapping[str, Sequence[str]] | None = None, coalesce: bool = True,
                **dims) -> Prediction:
        """The block FLOPs a plan executes over one generation, as a fraction of all-compute.

        A block executes at a call when its action is ``compute``; then each of its sub-sites
        that does not run (``reuse``, ``reuse_residual``, ``predict``) removes its FLOPs from the
        block (a site inside such a site is ``skipped``, not subtracted twice). Elementwise work
        (adding a residual, a forecast, an indicator) is not counted, as FlopCounterMode does not.
        ``plan`` is a :class:`~ditopt.plan.Plan` or the :class:`DecisionTable` it compiles to.
        ``steps_calls`` is the number of calls per step (2 for CFG run as two calls; default 1),
        or the step index of every call. A plan with ``when`` rules decides in the graph at run
        time: pass ``decisions`` (``ditopt.stats(model).decisions`` after a run) instead of, or
        with, the plan; the plan is then used for cache bytes only. ``coalesce`` predicts the
        cache as the passes lay it out by default: one per run of adjacent sites that decide alike.
        """
        table = None
        if plan is not None:
            table = plan if isinstance(plan, DecisionTable) else plan.compile(self.sites)
            if coalesce and not table.runs and self.users is not None:
                from ditopt.passes.coalesce_regions import table_runs

                table = replace(table, runs=table_runs(table, self.sites, self.users))
        if decisions is None:
            if table is None:
                raise ValueError("predict needs a plan or decisions")
            decisions, branches = self._static_decisions(table, steps_calls)
        else:
            unknown = [s for s in decisions if s not in self.costs]
            if unknown:
                raise KeyError(f"decisions name unknown site(s) {unknown}")
            branches = steps_calls if isinstance(steps_calls, int) else 1
        calls = max((len(row) for row in decisions.values()), default=0)
        per_call = {s: self.flops(s, **dims) for s in self.costs}
        blocks = self.block_sites()
        inside = {b: [s.name for s in self.sites if b in self.sites.ancestors(s.name)] for b in blocks}
        windowed = self._window_costs(table, decisions, **dims)
        executed = table.share_cfg_flops(decisions, per_call, inside) if table is not None else 0  # batched: half
        executed += table.partial_flops(decisions, per_call, blocks) if table is not None else 0  # ~ratio of a site
        for call in range(calls):
            for b in blocks:
                if _action(decisions, b, call) != Action.COMPUTE:
                    continue
                reused = sum(per_call[s] for s in inside[b]
                             if _action(decisions, s, call) not in (Action.SKIPPED, *RUNNING))  # stale_kv runs
                executed += per_call[b] - reused
                for s in set(windowed) & set(inside[b]):  # window: window attention, not full; keeping: both
                    action, (full, window) = _action(decisions, s, call), windowed[s]
                    keeps = action == Action.COMPUTE and keeps_residual(decisions[s], call, max(branches, 1))
                    executed += window - full if action == Action.WINDOW else window if keeps else 0
        total = calls * sum(per_call[b] for b in blocks)
        return Prediction(compute_fraction=executed / total if total else 1.0, block_flops=executed,
                          cache_bytes_peak=self._cache_peak(table, decisions, branches, dims),
                          total_block_flops=total)

    def _window_costs(self, table: DecisionTable | None, decisions, **dims) -> dict[str, tuple[int, int]]:
        """``{site: (its SDPA calls' FLOPs, their window attention's FLOPs)}`` for each window site."""
        if table is None:
            if any(Action.WINDOW in row for row in decisions.values()):
                raise ValueError("decisions with `window` need the plan too (the window sizes are in it)")
            return {}
        out = {}
        for site, window in table.windowed().items():
            calls = [[[self.evaluate(sympy.sympify(d), **dims) for d in x] for x in c]
                     for c in self._cost(site).attention]
            out[site] = tuple(sum(window_attention_flops(q, v, w or q[-2]) for q, v in calls) for w in (0, window))
        return out

    def _static_decisions(self, table: DecisionTable, steps_calls) -> tuple[dict[str, list[str]], int]:
        adaptive = [s for s, row in table.adaptive.items() if any(r is not None for r in row)]
        if adaptive:
            raise ValueError(f"the plan decides {adaptive[:3]} at run time ('when' rules): pass "
                             "decisions=ditopt.stats(model).decisions from a run")
        if steps_calls is None or isinstance(steps_calls, int):
            per_step = steps_calls or 1
            step_of_call = [s for s in range(table.steps) for _ in range(per_step)]
        else:
            step_of_call = list(steps_calls)
            per_step = max((step_of_call.count(s) for s in set(step_of_call)), default=1)
        return table.static_decisions(step_of_call, sites=list(self.costs)), per_step

    def _cache_peak(self, table: DecisionTable | None, decisions, branches: int, dims) -> int:
        """Bytes held once the generation has run: per CFG branch, each caching site keeps its
        last ``depth`` computed steps (``depth`` = highest Taylor order + 1, else 1), and each
        ``when`` rule its watched site's previous first output."""
        if table is not None:
            followers = {s for run in table.runs.values() for s in run[1:]}  # a run caches under its lead
            slots = {s: slot for s, slot in table.slots.items() if s not in followers}
            watched = [of for of, _ in table.when_rules]
            depth = table.depth
        else:
            slots = {s: SLOTS.get(a, "output") for s, row in decisions.items() for a in row
                     if a not in (Action.COMPUTE, Action.SKIPPED)}
            watched, depth = [], 1
        calls = max((len(row) for row in decisions.values()), default=0)
        steps = calls // max(branches, 1)
        held = 0
        for site, slot in slots.items():
            row = decisions.get(site, [Action.COMPUTE] * calls)
            if slot == SLOTS[Action.WINDOW]:  # stored at the full steps a later window step reads
                kept = sum(1 for c, a in enumerate(row) if a == Action.COMPUTE and keeps_residual(row, c, branches))
                held += min(depth, kept // max(branches, 1)) * self.evaluate(self.costs[site].window_bytes, **dims)
                continue
            computed_steps = sum(1 for a in row if a == Action.COMPUTE) // max(branches, 1)
            held += min(depth, computed_steps) * self.cache_bytes(site, slot, **dims)
        held += sum(min(depth, steps) * self.evaluate(self.costs[of].watch_bytes, **dims) for of in watched)
        return held * branches


def _action(decisions: Mapping[str, Sequence[str]], site: str, call: int) -> str:
    row = decisions.get(site)
    return row[call] if row is not None and call < len(row) else Action.COMPUTE


# -- building ----------------------------------------------------------------------------------

def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("example_value"), torch.Tensor)


def _token_dim(table: SiteTable, gm: fx.GraphModule, cap: SymbolicCapture) -> tuple[sympy.Expr | None, int | None]:
    """The token count and hidden size of the main stream: dims 1 and -1 of the first block's
    first rank-3 output whose token count depends on ``hidden_states``."""
    nodes = {n.name: n for n in gm.graph.nodes}
    hidden_syms = {e for (name, _), e in cap.sizes.items() if name == _HIDDEN and isinstance(e, sympy.Symbol)}
    blocks = [s for s in table if s.kind == "block" and s.parent == "stack"] or [s for s in table if s.kind == "block"]
    fallback = (None, None)
    for block in blocks:
        for out in block.live_outs:
            shape = node_shape(nodes[out], cap.expr) if out in nodes else None
            if shape is None or len(shape) != 3:
                continue
            tokens, hidden = shape[1], int(shape[-1]) if shape[-1].is_number else None
            if tokens.free_symbols & hidden_syms:
                return tokens, hidden
            if fallback == (None, None):
                fallback = (tokens, hidden)
    return fallback


def _eliminate(tokens: sympy.Expr | None) -> dict[sympy.Expr, sympy.Expr]:
    """A substitution that turns ``tokens`` into ``S``: one factor f of it becomes S / (tokens / f)."""
    if tokens is None or tokens.is_number:
        return {}
    if isinstance(tokens, sympy.Symbol):
        return {tokens: S}
    factors = list(tokens.args) if isinstance(tokens, sympy.Mul) else [tokens]
    for f in reversed(factors):
        others = [g for g in factors if g is not f]
        if f.is_number or any(f.free_symbols & g.free_symbols for g in others):
            continue
        return {f: S / (tokens / f)}
    raise CaptureError(f"cannot express the token count {tokens} as one symbol S")


def cost_model(model: torch.nn.Module, **example_inputs) -> CostModel:
    """Build the :class:`CostModel` of ``model`` from one call with ``example_inputs``.

    Example:
        >>> import torch, ditopt
        >>> from diffusers import DiTTransformer2DModel
        >>> model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
        ...     out_channels=4, num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
        >>> cost = ditopt.cost_model(model, hidden_states=torch.randn(2, 4, 8, 8),
        ...                          timestep=torch.tensor([1, 1]), class_labels=torch.tensor([1, 2]))
        >>> cost.dims, cost.hidden
        ({'B': 2, 'S': 16}, 16)
        >>> cost.expr("transformer_blocks.0.attn1")      # 4 linear layers + attention
        64*B*S**2 + 2048*B*S
        >>> cost.flops("transformer_blocks.0.attn1", S=64)   # at sample_size 16
        786432
        >>> cost.predict(ditopt.presets.fora(interval=2, steps=10, level="block")).compute_fraction
        0.5
    """
    from torch._dynamo.eval_frame import OptimizedModule

    from .capture import capture

    if isinstance(model, OptimizedModule):
        model = model._orig_mod
    plain = capture(model, **example_inputs)
    table = find_sites(plain.gm.graph)
    table.model = type(model).__name__
    users = {n.name: {u.name for u in n.users} for n in plain.gm.graph.nodes}
    cap = capture_symbolic(model, **_batch_of_two(example_inputs))
    symbolic_table = find_sites(cap.gm.graph)
    missing = [n for n in table.names() if n not in symbolic_table]
    if missing:
        raise CaptureError(f"the symbolic capture of {type(model).__name__} lacks sites {missing[:4]}")

    tokens, hidden = _token_dim(symbolic_table, cap.gm, cap)
    eliminate = _eliminate(tokens)
    rename: dict[sympy.Expr, sympy.Expr] = {}
    definitions: dict[str, sympy.Expr] = {}
    symbols: dict[str, sympy.Symbol] = {}
    if tokens is not None and not tokens.is_number:
        definitions["S"], symbols["S"] = tokens, S
    for (name, dim), size_expr in sorted(cap.sizes.items()):
        if not isinstance(size_expr, sympy.Symbol) or size_expr in rename or size_expr in eliminate:
            continue
        if (name, dim) == (_HIDDEN, 0):
            rename[size_expr], symbols["B"], definitions["B"] = B, B, size_expr
        elif (name, dim) == (_TEXT, 1):
            rename[size_expr], symbols["L"], definitions["L"] = L, L, size_expr
    for (name, dim), size_expr in sorted(cap.sizes.items()):
        if isinstance(size_expr, sympy.Symbol) and size_expr not in rename and size_expr not in eliminate:
            sym = sympy.Symbol(f"{name}_{dim}", integer=True, positive=True)
            rename[size_expr], symbols[sym.name], definitions[sym.name] = sym, sym, size_expr

    def to_dims(expr: sympy.Expr) -> sympy.Expr:
        return sympy.expand(expr.xreplace(eliminate).xreplace(rename))

    nodes = {n.name: n for n in cap.gm.graph.nodes}
    flops_of = {n.name: node_flops(n, cap.expr) for n in cap.gm.graph.nodes}
    costs: dict[str, SiteCost] = {}
    for site in table:
        sym_site = symbolic_table[site.name]
        flops = sum((flops_of[n] for n in sym_site.nodes), sympy.Integer(0))
        # The symbolic graph also has SymInt live-outs; the cache holds the tensors the plain
        # capture's live-outs name (node names agree between the two captures).
        outs = [nodes[o] for o in site.live_outs if o in nodes and _is_tensor(nodes[o])]
        if len(outs) != len(site.live_outs):
            outs = [nodes[o] for o in sym_site.live_outs if _is_tensor(nodes[o])]
        sizes = [math.prod(node_shape(o, cap.expr), start=sympy.Integer(1)) * o.meta["example_value"].element_size()
                 for o in outs]
        output_bytes = sum(sizes, sympy.Integer(0))
        has_residual = bool(site.residual_inputs) and all(r is not None for r in site.residual_inputs)
        attention = tuple((tuple(map(to_dims, q)), tuple(map(to_dims, v))) for q, v in attention_calls(
            (nodes[m] for m in sym_site.nodes), cap.expr)) if site.attention == "self" else ()
        window_bytes = sum((math.prod(q[:-1]) * v[-1] for q, v in attention), sympy.Integer(0)) * (
            outs[0].meta["example_value"].element_size() if outs else 4)  # its SDPA outputs
        costs[site.name] = SiteCost(site.name, site.kind, to_dims(flops), to_dims(output_bytes),
                                    to_dims(output_bytes) if has_residual else None,
                                    to_dims(sizes[0]) if sizes else sympy.Integer(0), attention, window_bytes)

    used = set().union(*(e.free_symbols for c in costs.values() for e in (c.flops, c.output_bytes)))
    symbols = {name: sym for name, sym in symbols.items() if sym in used}
    definitions = {name: d for name, d in definitions.items() if name in symbols}
    order = ["B", "S", "L", *sorted(definitions)]
    definitions = {name: definitions[name] for name in dict.fromkeys(order) if name in definitions}
    dims = {name: int(definition.xreplace(cap.values)) for name, definition in definitions.items()}
    if "B" in dims and _batch_of_two(example_inputs) is not example_inputs:
        dims["B"] = 1  # the capture ran at 2; the caller's example is 1
    return CostModel(table, costs, dims, symbols, hidden, definitions, cap.sizes, users)


__all__ = ["B", "L", "S", "CostModel", "Prediction", "SiteCost", "capture_symbolic", "cost_model", "node_flops"]
