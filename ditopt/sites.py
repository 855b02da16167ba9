"""Find the sites of a captured graph: the regions a plan can address.

A site is a set of graph nodes a plan can tell to compute or reuse: a transformer block, an
attention call, a feed-forward, or the whole block stack. Sites are found from the graph
alone, never from a per-model table:

- a node belongs to a module's region when that module's forward was active as the node ran
  (``nn_module_stack``); parameters arrive as placeholders and belong to no region;
- a **block** is the outermost integer-indexed module (``blocks.3``) whose region contains an
  attention op, or a module of such a block's class outside any list (a U-ViT's mid block);
- a region whose outputs nothing reads (Kandinsky 6's audio blocks, called without audio) is no
  site, nor is anything inside it;
- an **attention** site is the innermost module around an attention op (a block that is itself
  that module is one site, the block); it is ``cross`` when
  its keys depend on a tensor its queries do not, ``joint`` when its queries mix two token
  streams, ``self`` otherwise;
- a **feedforward** is the outermost module inside a block, outside attention, that holds two
  or more matmuls and maps one token tensor to one of the same shape;
- the **stack** runs from the first block's first node to the last block's last node, keeping
  the nodes that depend on the first block (independent work in that range is left outside);
  its blocks are those of the lists that no module the forward calls holds (a list in a
  ``ModuleDict`` counts; a refiner's blocks inside a text embedder do not);
- the **output** is every node from the stack's first to the graph's output (the stack, final
  norm, projection, unpatchify): the model's output as a function of what ran before the stack. Forecasting
  it is forecasting what the sampler receives;
- a site's **modulated input** is the activation its computation starts from after the norm and
  modulation: for an attention or feed-forward site, its data input shaped like its output; for a
  block, that of its first attention site, shaped like the block's first live-out (TeaCache
  watches it); for the stack, its first block's.

Plans address sites by glob over names (``blocks.*``) or by position in the stack: ``stack[i]``
and ``stack[a:b]`` select the stack's blocks (the blocks whose parent is the stack, in graph
order) by Python index or slice, with the sites inside them, as a glob would.

Dataflow (region inputs, live-outs, residual form ``out = in + delta``) is computed on the fx
graph by :mod:`ditopt.regions` (its public names are re-exported here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch.fx as fx

from .capture import module_stack
from .regions import (Region, attention_query_key, extractable, is_attention_op, is_matmul, is_param, region_of,
                      residual_inputs, same_meta, same_shape, tensor_meta)

SITE_KINDS = ("block", "attention", "feedforward", "stack", "output")
STACK = "stack"
OUTPUT = "output"

_INDEXED = re.compile(r"^(.*)\.(\d+)$")


@dataclass(frozen=True)
class Site:
    """A region of the graph that a plan can address.

    ``name`` is the module path (``blocks.3``, ``blocks.3.attn1``) or ``stack``; ``kind`` one of
    block, attention, feedforward, stack. The rest describes the region and is not part of
    equality: ``Site("blocks.3", "block") == found_site`` compares name and kind only.
    """

    name: str
    kind: str
    attention: str | None = field(default=None, compare=False)  # self | cross | joint
    module_type: str = field(default="", compare=False)
    nodes: tuple[str, ...] = field(default=(), compare=False, repr=False)
    inputs: tuple[str, ...] = field(default=(), compare=False, repr=False)
    live_outs: tuple[str, ...] = field(default=(), compare=False, repr=False)
    residual_inputs: tuple[str | None, ...] = field(default=(), compare=False, repr=False)
    residual_form: bool = field(default=False, compare=False, repr=False)
    parent: str | None = field(default=None, compare=False, repr=False)
    skippable: bool = field(default=True, compare=False, repr=False)
    why_not_skippable: str = field(default="", compare=False, repr=False)
    modulated_input: str | None = field(default=None, compare=False, repr=False)

    def matches(self, pattern: str) -> bool:
        """fnmatch ``pattern`` against the name (``blocks.*`` also matches ``blocks.3.attn1``)."""
        return fnmatchcase(self.name, pattern)


_POSITIONAL = re.compile(r"^stack\[([^\]]*)\]$")


def is_positional(pattern: str) -> bool:
    """``stack[...]``: a pattern that selects the stack's blocks by position, not by name."""
    return bool(_POSITIONAL.match(pattern.removeprefix("!")))


def parse_slice(text: str) -> slice:
    """Python's index and slice syntax as a slice: ``"i"`` is item ``i`` (``slice(i, i + 1)``, and
    ``"-1"`` is ``slice(-1, None)``, the last item), ``"a:b"`` and ``"a:b:c"`` with any part
    empty. ValueError naming ``text`` when it is empty, not ints, has more than three parts or a
    step of 0.

    Example:
        >>> parse_slice("5"), parse_slice("-1"), parse_slice("2:"), parse_slice("1:10:2")
        (slice(5, 6, None), slice(-1, None, None), slice(2, None, None), slice(1, 10, 2))
        >>> parse_slice("1:2:0")
        Traceback (most recent call last):
        ...
        ValueError: not a slice: '1:2:0' (step 0)
    """
    parts = text.split(":")
    if len(parts) > 3:
        raise ValueError(f"not a slice: {text!r} (more than three parts)")
    try:
        nums = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        raise ValueError(f"not a slice: {text!r} (use i or start:stop:step, ints)") from None
    if len(nums) == 1:
        if nums[0] is None:
            raise ValueError(f"not a slice: {text!r} (empty)")
        i = nums[0]
        return slice(i, i + 1 if i != -1 else None)
    if len(nums) == 3 and nums[2] == 0:
        raise ValueError(f"not a slice: {text!r} (step 0)")
    return slice(*nums)


def parse_position(pattern: str) -> slice:
    """The slice a ``stack[...]`` pattern takes of the stack's blocks (:func:`parse_slice` of the
    text in brackets); ValueError if malformed.

    Example:
        >>> parse_position("stack[2:]"), parse_position("stack[-1]"), parse_position("stack[0]")
        (slice(2, None, None), slice(-1, None, None), slice(0, 1, None))
    """
    malformed = f"not a stack position: {pattern!r} (use stack[i] or stack[start:stop:step])"
    m = _POSITIONAL.match(pattern.removeprefix("!"))
    if not m:
        raise ValueError(malformed)
    if not m.group(1).strip():
        raise ValueError(f"empty stack position: {pattern!r}")
    try:
        return parse_slice(m.group(1))
    except ValueError:
        raise ValueError(malformed) from None


class SiteTable:
    """The sites of one graph, in graph order, with lookups by name, glob and stack position.

    Example:
        >>> table = SiteTable([Site("stack", "stack"), Site("blocks.0", "block", parent="stack"),
        ...                    Site("blocks.0.attn1", "attention", parent="blocks.0"),
        ...                    Site("blocks.1", "block", parent="stack")])
        >>> [s.name for s in table.match(["blocks.*", "!blocks.0"])]
        ['blocks.0.attn1', 'blocks.1']
        >>> [s.name for s in table.match("stack[1:]")], [s.name for s in table.match("stack[0]", kind="block")]
        (['blocks.1'], ['blocks.0'])
    """

    def __init__(self, sites: list[Site], model: str | None = None):
        self.sites = list(sites)
        self.by_name = {s.name: s for s in self.sites}
        self.model = model  # the class name of the model the sites were found in, when known

    def __iter__(self):
        return iter(self.sites)

    def __len__(self):
        return len(self.sites)

    def __getitem__(self, name: str) -> Site:
        return self.by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def names(self) -> list[str]:
        return [s.name for s in self.sites]

    def match(self, patterns: str | list[str], kind: str | None = None, attention: str | None = None) -> list[Site]:
        """Sites matched by the patterns (``!pattern`` excludes), optionally of one ``kind`` and,
        for attention sites, one ``attention`` kind (self | cross | joint).

        A pattern is an fnmatch glob over site names, or ``stack[i]`` / ``stack[a:b:c]``: the
        stack's blocks at those positions (see :meth:`stack_blocks`) and the sites inside them.
        """
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        include = [p for p in patterns if not p.startswith("!")]
        exclude = [p[1:] for p in patterns if p.startswith("!")]
        return [
            s for s in self.sites
            if any(self._matches(s, p) for p in include)
            and not any(self._matches(s, p) for p in exclude)
            and (kind is None or s.kind == kind)
            and (attention is None or s.attention == attention)
        ]

    def stack_blocks(self) -> list[str]:
        """The blocks whose parent is the stack, in graph order: what ``stack[...]`` indexes."""
        return [s.name for s in self.sites if s.kind == "block" and s.parent == STACK]

    def _matches(self, site: Site, pattern: str) -> bool:
        if not is_positional(pattern):
            return site.matches(pattern)
        chosen = set(self.stack_blocks()[parse_position(pattern)])
        return site.name in chosen or any(a in chosen for a in self.ancestors(site.name))

    def ancestors(self, name: str) -> list[str]:
        """Names of the sites that contain ``name``, innermost first."""
        out, parent = [], self.by_name[name].parent
        while parent is not None:
            out.append(parent)
            parent = self.by_name[parent].parent
        return out


# -- finding sites ---------------------------------------------------------------------------

def _module_regions(graph: fx.Graph) -> tuple[dict[str, list[fx.Node]], dict[str, str]]:
    """Nodes of each module call (first call of each module path) and each module's type."""
    regions: dict[str, list[fx.Node]] = {}
    first_key: dict[str, str] = {}
    types: dict[str, str] = {}
    for n in graph.nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        for path, key, typ in module_stack(n):
            if not path:
                continue
            first_key.setdefault(path, key)
            if key != first_key[path]:
                continue  # a later call of the same module is not part of its site
            regions.setdefault(path, []).append(n)
            types.setdefault(path, getattr(typ, "__name__", str(typ)))
    return regions, types


def _attention_kind(op: fx.Node, region: Region) -> str:
    members = set(region.nodes)

    def data_sources(x) -> set[fx.Node]:
        if not isinstance(x, fx.Node):
            return set()
        seen, stack, found = set(), [x], set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n not in members:
                if not is_param(n):
                    found.add(n)
                continue
            stack.extend(n.all_input_nodes)
        return found

    def projected_sources(x) -> set[fx.Node]:
        """Sources the query reads through a projection (a matmul with a weight): its token
        streams. A rotary table or a mask made outside the attention and applied to the
        projected query is not one (Kandinsky 5 builds its rotary table from position indices)."""
        seen, stack, found = set(), [(x, False)], set()
        while stack:
            n, projected = stack.pop()
            if not isinstance(n, fx.Node) or (n, projected) in seen:
                continue
            seen.add((n, projected))
            if n not in members:
                if projected and not is_param(n):
                    found.add(n)
                continue
            through = projected or (is_matmul(n) and any(is_param(a) for a in n.all_input_nodes))
            stack.extend((a, through) for a in n.all_input_nodes)
        return found

    q, k = attention_query_key(op)
    q_src, k_src = data_sources(q), data_sources(k)
    if k_src - q_src:
        return "cross"
    streams = projected_sources(q) or q_src  # no projection in the region: every source may be a stream
    token_streams = [s for s in streams if tensor_meta(s) is not None and len(tensor_meta(s)[0]) >= 3]
    return "joint" if len(token_streams) >= 2 else "self"


def find_sites(graph: fx.Graph) -> SiteTable:
    """All sites of a captured graph, in graph order."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    regions, types = _module_regions(graph)
    attention_ops = [n for n in graph.nodes if is_attention_op(n)]

    def holds_attention(path: str) -> bool:
        members = set(regions[path])
        return any(op in members for op in attention_ops)

    blocks = [p for p in regions if _INDEXED.match(p) and holds_attention(p)]
    listed = {types[p] for p in blocks}  # a lone module of a listed block's class is a block too (U-ViT's mid block)
    blocks += [p for p in regions if not _INDEXED.match(p) and types.get(p) in listed and holds_attention(p)]
    blocks = [p for p in blocks if not any(p != q and p.startswith(q + ".") for q in blocks)]

    attention_paths: dict[str, fx.Node] = {}
    for op in attention_ops:
        stack = [path for path, _, _ in module_stack(op) if path in regions]
        if stack:
            attention_paths.setdefault(stack[-1], op)

    feedforwards = []
    for block in blocks:
        inner = [p for p in regions if p.startswith(block + ".")]
        for p in inner:
            if any(p == a or p.startswith(a + ".") or a.startswith(p + ".") for a in attention_paths):
                continue
            if sum(1 for n in regions[p] if is_matmul(n)) < 2:
                continue
            region = region_of(regions[p])
            outs = [o for o in region.live_outs if tensor_meta(o) is not None]
            if len(outs) != 1 or len(tensor_meta(outs[0])[0]) < 3:
                continue
            if not any(same_meta(tensor_meta(i), tensor_meta(outs[0])) for i in region.inputs if not is_param(i)):
                continue
            feedforwards.append(p)
    feedforwards = [p for p in feedforwards if not any(p != q and p.startswith(q + ".") for q in feedforwards)]

    candidates: list[tuple[str, str, list[fx.Node], str | None]] = []
    for p in blocks:
        candidates.append((p, "block", regions[p], None))
    for p, op in attention_paths.items():
        if p not in blocks:  # a block that is its own attention module (WanAnimate's face adapter): one site
            candidates.append((p, "attention", regions[p], _attention_kind(op, region_of(regions[p]))))
    for p in feedforwards:
        candidates.append((p, "feedforward", regions[p], None))
    stack_blocks = _main_stack_blocks(blocks, set(types))
    if stack_blocks:
        stack_nodes = _stack_nodes(graph, [regions[b] for b in stack_blocks], order)
        candidates.append((STACK, "stack", stack_nodes, None))
        head = _output_nodes(graph, stack_nodes, order)
        if len(head) > len(stack_nodes):
            candidates.append((OUTPUT, "output", head, None))

    sites, dead = [], []
    for name, kind, nodes, attn in candidates:
        nodes = sorted(nodes, key=order.__getitem__)
        region = region_of(nodes)
        if not region.live_outs or any(name.startswith(d + ".") for d in dead):
            dead.append(name)  # nothing reads it (Kandinsky 6's audio blocks, called without audio): no site
            continue
        res, residual = residual_inputs(region, order)
        ok, why = extractable(region, order)
        sites.append(Site(
            name=name, kind=kind, attention=attn, module_type=types.get(name, "") if kind not in ("stack", "output") else kind,
            nodes=tuple(n.name for n in nodes), inputs=tuple(n.name for n in region.inputs),
            live_outs=tuple(n.name for n in region.live_outs),
            residual_inputs=tuple(r.name if r is not None else None for r in res),
            residual_form=residual, skippable=ok, why_not_skippable=why,
        ))
    index = {n.name: i for i, n in enumerate(graph.nodes)}
    first = {s.name: min((index[n] for n in s.nodes if n in index), default=-1) for s in sites}
    sites.sort(key=lambda s: (first[s.name], -len(s.nodes)))
    return SiteTable(_with_modulated_inputs(_with_parents(sites), graph))


def _main_stack_blocks(blocks: list[str], called: set[str] = frozenset()) -> list[str]:
    """The blocks of the main stack: those of the lists no module the forward calls holds (the
    lists may sit in containers: Flux 3's ``mode_blocks.image``); else, where every list is inside
    one (a wrapper model), the lists nearest the model's root.

    (HunyuanVideo also has refiner blocks inside its text embedder; they are blocks, but not
    the stack.)
    """
    if not blocks:
        return []

    def container(block: str) -> str:  # the list a block is in, or a lone block's parent
        indexed = _INDEXED.match(block)
        return indexed.group(1) if indexed else block.rpartition(".")[0]

    def held(block: str) -> bool:
        parts = container(block).split(".")
        return any(".".join(parts[:i]) in called for i in range(1, len(parts) + 1) if parts[0])

    free = [b for b in blocks if not held(b)]
    if free:
        return free
    depth = {b: container(b).count(".") for b in blocks}
    shallowest = min(depth.values())
    return [b for b in blocks if depth[b] == shallowest]


def _stack_nodes(graph: fx.Graph, block_regions: list[list[fx.Node]], order: dict[fx.Node, int]) -> list[fx.Node]:
    first = min(order[n] for r in block_regions for n in r)
    last = max(order[n] for r in block_regions for n in r)
    in_range = [n for n in graph.nodes if first <= order[n] <= last and n.op not in ("placeholder", "output")]
    first_block = block_regions[0] if order[block_regions[0][0]] == first else min(block_regions, key=lambda r: order[r[0]])
    reach = set(first_block)  # and everything downstream of it: one pass, as the graph is in topological order
    for n in graph.nodes:
        if n not in reach and any(a in reach for a in n.all_input_nodes):
            reach.add(n)
    members = {n for r in block_regions for n in r}
    return [n for n in in_range if n in reach or n in members]


def _output_nodes(graph: fx.Graph, stack_nodes: list[fx.Node], order: dict[fx.Node, int]) -> list[fx.Node]:
    """Every node from the stack's first to the graph's output: the model's output as a function
    of what was computed before the stack (all of it is used only on the way to the output)."""
    first = min(order[n] for n in stack_nodes)
    return [n for n in graph.nodes if order[n] >= first and n.op not in ("placeholder", "output")]


def _with_modulated_inputs(sites: list[Site], graph: fx.Graph) -> list[Site]:
    """Set each site's ``modulated_input`` (see the module docstring), or leave it None.

    The candidates are the data inputs of the attention (or feed-forward) region shaped like
    the hidden states; one computed inside the enclosing block (after its norm and modulation)
    is preferred over one that enters the block unchanged.
    """
    by_name = {n.name: n for n in graph.nodes}
    table = SiteTable(sites)

    def shape(name: str):
        meta = tensor_meta(by_name[name])
        return meta[0] if meta is not None else None

    def pick(region: Site, like: str, inside: Site | None) -> str | None:
        want = shape(like)
        found = [i for i in region.inputs if not is_param(by_name[i]) and same_shape(shape(i), want)]
        inner = [i for i in found if inside is not None and i in set(inside.nodes)]
        return (inner or found or [None])[0]

    def first_attention(block: Site) -> Site | None:
        return next((s for s in sites if s.kind == "attention" and block.name in table.ancestors(s.name)), None)

    modulated: dict[str, str | None] = {}
    for s in sites:
        if not s.live_outs:
            modulated[s.name] = None
        elif s.kind in ("attention", "feedforward"):
            modulated[s.name] = pick(s, s.live_outs[0], table[s.parent] if s.parent else None)
        elif s.kind == "block":
            attn = first_attention(s)
            modulated[s.name] = pick(attn, s.live_outs[0], s) if attn is not None else None
    for s in sites:
        if s.kind in ("stack", "output"):
            first = next((b for b in sites if b.kind == "block" and b.parent == s.name), None)
            modulated[s.name] = modulated.get(first.name) if first is not None else None
    return [Site(**{**s.__dict__, "modulated_input": modulated.get(s.name)}) for s in sites]


def _with_parents(sites: list[Site]) -> list[Site]:
    """Set each site's parent: the smallest other site whose nodes contain all of its nodes."""
    node_sets = {s.name: set(s.nodes) for s in sites}
    out = []
    for s in sites:
        containing = [
            o for o in sites
            if o.name != s.name and node_sets[s.name] <= node_sets[o.name] and len(o.nodes) > len(s.nodes)
        ]
        parent = min(containing, key=lambda o: len(o.nodes)).name if containing else None
        out.append(Site(**{**s.__dict__, "parent": parent}))
    return out
