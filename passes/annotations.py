"""Typed ditopt annotations on fx nodes and graphs: the only module that touches ``meta["ditopt"]``.

A node's annotation (:class:`NodeAnnotation`, frozen) says what the passes made of it: the
``role`` of a node a pass inserted, the ``site`` it serves, the reusing ``regions`` it belongs
to, the ``when`` rules that ``watch`` it. The graph's annotation (:class:`GraphAnnotation`)
says which sites are rewritten (their cache slot and nesting depth) and which already have a
skip branch, and which self-attention sites compute window attention at some steps. Everything else about a site (its nodes, live-outs, residual inputs) is in the
pass context's :class:`~ditopt.sites.SiteTable`: the one source of site information.

Example:
    >>> import torch.fx as fx
    >>> g = fx.Graph(); x = g.placeholder("x")
    >>> _ = annotate(x, role=Role.TOKEN); role_of(x), token_of(g) is x
    (<Role.TOKEN: 'token'>, True)
    >>> annotate(x, regions=("blocks.1", "blocks.0")).regions
    ('blocks.0', 'blocks.1')
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import torch.fx as fx

KEY = "ditopt"


class Role(str, Enum):
    """What a node a pass inserted is for."""

    TOKEN = "token"  # the runtime token placeholder every effect mutates
    BEGIN_STEP = "begin_step"  # ditopt::begin_step: advances the step state
    DECIDE = "decide"  # ditopt::decide: the site's compute predicate
    LOAD = "load"  # ditopt::cache_load: what a skipped site reads back
    RESIDUAL = "residual"  # output - input of a reuse_residual site (inside its region)
    STORE = "store"  # ditopt::cache_store
    INDICATOR = "indicator"  # ditopt::update_indicator
    OBSERVE = "observe"  # ditopt::observe (profiling graphs)
    SKIP_BRANCH = "skip_branch"  # the torch.cond (or its eager lowering) of a site
    BRANCH_FN = "branch_fn"  # get_attr of a skip branch's compute / reuse graph
    BRANCH_OUTPUT = "branch_output"  # getitem of a skip branch's output

    def __hash__(self) -> int:  # as the plain string's, so that either finds the other in a dict
        return str.__hash__(self)


@dataclass(frozen=True)
class NodeAnnotation:
    role: Role | None = None
    site: str | None = None  # the site an inserted node serves
    index: int | None = None  # which live-out a load / store is for
    regions: tuple[str, ...] = ()  # the rewritten sites whose region contains the node, sorted
    watch: tuple[int, ...] = ()  # the when rules whose indicator watches this node, sorted
    replaced: tuple[str, ...] = ()  # a skip branch: the names of the nodes it took into its branches


_EMPTY = NodeAnnotation()


def node_annotation(node: fx.Node) -> NodeAnnotation:
    """The node's annotation (an empty one if it has none)."""
    return node.meta.get(KEY, _EMPTY)


def annotate(node: fx.Node, **fields) -> NodeAnnotation:
    """Set fields of the node's annotation (a new frozen object: copies of the node keep theirs)."""
    for name in ("regions", "watch"):
        if name in fields:
            fields[name] = tuple(sorted(set(fields[name])))
    if "replaced" in fields:
        fields["replaced"] = tuple(fields["replaced"])
    if fields.get("role") is not None:
        fields["role"] = Role(fields["role"])
    new = replace(node_annotation(node), **fields)
    node.meta[KEY] = new
    return new


def role_of(node: fx.Node) -> Role | None:
    return node_annotation(node).role


def regions_of(node: fx.Node) -> frozenset[str]:
    return frozenset(node_annotation(node).regions)


def enclosing(members: list[fx.Node], site: str) -> frozenset[str]:
    """The regions that hold all of ``site``'s ``members``: the sites enclosing it (not those of its
    first node alone, which may also open a site nested in it, as the first block opens ``output``)."""
    return frozenset.intersection(*(regions_of(n) for n in members)) - {site}


def nodes_with_role(graph: fx.Graph, role: Role, site: str | None = None) -> list[fx.Node]:
    """The nodes of ``role`` (serving ``site``, if given), in live-out index order, else graph order."""
    found = [n for n in graph.nodes if node_annotation(n).role is role
             and (site is None or node_annotation(n).site == site)]
    return sorted(found, key=lambda n: node_annotation(n).index or 0)


def token_of(graph: fx.Graph) -> fx.Node | None:
    """The runtime token placeholder, if ``insert_step_tracking`` has added it."""
    for node in graph.find_nodes(op="placeholder"):
        if role_of(node) is Role.TOKEN:
            return node
    return None


@dataclass(frozen=True)
class SiteRewrite:
    """How one site is rewritten: the cache slot it stores and loads, how many rewritten sites
    enclose it (skip branches are made innermost first), and its schedule (its action, ``when``
    rule and Taylor order at every step: sites with equal schedules decide alike)."""

    slot: str
    depth: int
    schedule: tuple = ()

    @property
    def adaptive(self) -> bool:
        """Some step of the site is decided by a ``when`` rule (on the device)."""
        return len(self.schedule) > 1 and any(rule is not None for rule in self.schedule[1])


@dataclass
class GraphAnnotation:
    annotated: bool = False  # annotate_decisions has run
    rewrites: dict[str, SiteRewrite] = field(default_factory=dict)  # the sites that get a skip branch
    skip_branches: set[str] | None = None  # sites given one so far (None: insert_skip_branches not run)
    coalesced: dict[str, tuple[str, ...]] = field(default_factory=dict)  # lead site -> the run it stands for
    windows: dict[str, int] = field(default_factory=dict)  # self-attention sites planned `window` -> window (tokens)
    window_branches: set[str] | None = None  # window sites given their branches so far (None: pass not run)
    cfg_shared: dict[str, Any] = field(default_factory=dict)  # batched-CFG share_cfg sites -> their CfgLayout
    cfg_branches: set[str] | None = None  # share_cfg sites given their branches so far (None: pass not run)
    partials: dict[str, float] = field(default_factory=dict)  # sites planned `partial` -> ratio of tokens
    partial_branches: set[str] | None = None  # partial sites given their branches so far (None: pass not run)


def graph_annotation(gm: fx.GraphModule) -> GraphAnnotation:
    """The graph's annotation, created empty on first use."""
    ga = gm.meta.get(KEY)
    if not isinstance(ga, GraphAnnotation):
        ga = gm.meta[KEY] = GraphAnnotation()
    return ga


__all__ = ["GraphAnnotation", "KEY", "NodeAnnotation", "Role", "SiteRewrite", "annotate",
           "graph_annotation", "node_annotation", "nodes_with_role", "regions_of", "role_of", "token_of"]
