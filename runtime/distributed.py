"""What a sequence-parallel graph calls: sharding, gathering, distributed attention, and the
byte accounting of every collective it runs.

The pass ``passes/sequence_parallel.py`` rewrites a graph so that each rank holds a slice of the
token dimension; the functions here are the call targets it inserts (plain functions of tensors
and constants, so the generated code names them and dynamo, aot and inductor trace through them:
every collective is a functional collective, ``torch.distributed._functional_collectives``).

A **layout** (``segs``) says how the token dimension of a value is made up, in global order:
``(("s", n), ("r", m))`` is ``n`` tokens sharded over the ranks (each holds ``n // world``
consecutive ones) followed by ``m`` tokens every rank holds (text tokens joined to the image
tokens in joint attention).

Bytes are counted per collective kind in the runtime's ``comm_bytes`` (``ditopt.stats``): the
bytes this rank hands to other ranks, its own chunk excluded: an all-to-all of ``b`` bytes sends
``b (world - 1) / world``, an all-gather of a ``b``-byte chunk ``b (world - 1)`` (what a ring
all-gather sends), a ring hop its whole tensor. Counting happens when the collective runs
eagerly; under tracing (fake tensors, torch.compile) nothing is counted.

**Across ranks** (the bottom of this file): a ``when`` rule's indicator is averaged over the ranks
before its decision (``ditopt::update_indicator_across``, an all-reduce of two numbers), so every
rank decides alike; ``SequenceParallel(check=True)`` all-gathers a checksum of each call's schedule
first (``ditopt::check_decisions``) and raises on divergence; a collective that fails (a peer died,
or did not answer within the group's timeout: :func:`timed_group`) raises naming the rank and step.
"""

from __future__ import annotations

import zlib
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from .attention_lse import attention_with_lse, merge_partials
from .decisions import Action
from .session import _RUNTIMES, get_runtime

if dist.is_available():  # builds without distributed support import ditopt all the same
    import torch.distributed._functional_collectives as funcol

KINDS = ("all_to_all", "all_gather", "ring", "all_reduce", "check")
# What a failure raises: ditopt.parallel registers ditopt.errors' classes (the runtime imports nothing above it).
ERRORS: dict[str, type[Exception]] = {"divergence": RuntimeError, "failure": RuntimeError}
_TIMEOUTS: dict[str, float] = {}  # group name -> the timeout its collectives were made with (seconds)
_GROUPS: dict[tuple[str, float], "dist.ProcessGroup"] = {}

Segs = tuple[tuple[str, int], ...]


# -- accounting ------------------------------------------------------------------------------

def _traced(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or torch.compiler.is_compiling()


def record(rid: int, kind: str, nbytes: int) -> None:
    """Add ``nbytes`` sent by a ``kind`` collective to runtime ``rid``'s counters (and the total)."""
    counters = get_runtime(rid).comm_bytes
    counters[kind] = counters.get(kind, 0) + int(nbytes)
    counters["total"] = counters.get("total", 0) + int(nbytes)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# -- layouts ---------------------------------------------------------------------------------

def local_length(segs: Segs, world: int) -> int:
    """Tokens one rank holds of a layout."""
    return sum(n // world if kind == "s" else n for kind, n in segs)


def slice_layout(segs: Segs, s: slice, world: int) -> tuple[Segs, slice] | None:
    """The segments ``x[s]`` keeps of a layout, and ``s`` in local positions; None unless ``s``
    (step 1, int bounds) cuts at segment boundaries.

    >>> slice_layout((("r", 6), ("s", 48)), slice(6, None), 2)
    ((('s', 48),), slice(6, None, None))
    >>> slice_layout((("s", 48), ("r", 6)), slice(None, -6), 2)
    ((('s', 48),), slice(None, -6, None))
    """
    total = sum(n for _, n in segs)
    bounds, local = [0], [0]
    for kind, n in segs:
        bounds.append(bounds[-1] + n)
        local.append(local[-1] + (n // world if kind == "s" else n))
    a = 0 if s.start is None else max(0, min(total, s.start + total if s.start < 0 else s.start))
    b = total if s.stop is None else max(0, min(total, s.stop + total if s.stop < 0 else s.stop))
    if a not in bounds or b not in bounds or a >= b:
        return None
    ia, ib = bounds.index(a), bounds.index(b)

    def place(orig, i, stop):
        if orig is None or orig >= 0:
            return None if orig is None else local[i]
        v = local[i] - local[-1]
        return None if v == 0 and stop else v

    return segs[ia:ib], slice(place(s.start, ia, False), place(s.stop, ib, True), s.step)


def _pieces(x: torch.Tensor, dim: int, segs: Segs, world: int, local: bool) -> list[torch.Tensor]:
    """``x`` split along ``dim`` into its segments (local lengths if ``local``, else global)."""
    sizes = [n // world if (kind == "s" and local) else n for kind, n in segs]
    return list(torch.split(x, sizes, dim=dim))


def shard(x: torch.Tensor, dim: int, segs: Segs, rank: int, world: int) -> torch.Tensor:
    """This rank's part of a value every rank holds whole: of each sharded segment the
    ``rank``-th slice, each replicated segment whole. No communication; a dense copy (like a
    value computed on this rank: caches and compiled branches expect its strides)."""
    if len(segs) == 1 and segs[0][0] == "s":
        n = segs[0][1] // world
        return x.narrow(dim, rank * n, n).contiguous()
    out = []
    for piece, (kind, n) in zip(_pieces(x, dim, segs, world, local=False), segs):
        out.append(piece.narrow(dim, rank * (n // world), n // world) if kind == "s" else piece)
    return torch.cat(out, dim=dim)


def _all_gather(x: torch.Tensor, dim: int, group: str, world: int, rid: int) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim``, rank order."""
    x = x.contiguous()
    out = _collective("all-gather", group, world, rid, lambda: funcol.all_gather_single(x, dim, group))
    if not _traced(x):
        record(rid, "all_gather", _nbytes(x) * (world - 1))
    return out


def gather(x: torch.Tensor, dim: int, segs: Segs, group: str, rank: int, world: int, rid: int) -> torch.Tensor:
    """The whole value from this rank's part of it (:func:`shard` undone): every sharded segment
    all-gathered along ``dim``."""
    if len(segs) == 1 and segs[0][0] == "s":
        return _all_gather(x, dim, group, world, rid)
    out = []
    for piece, (kind, _) in zip(_pieces(x, dim, segs, world, local=True), segs):
        out.append(_all_gather(piece, dim, group, world, rid) if kind == "s" else piece)
    return torch.cat(out, dim=dim)


# -- attention -------------------------------------------------------------------------------

def _heads_to_tokens(x: torch.Tensor, group: str, world: int, rid: int) -> torch.Tensor:
    """``[B, H, n, d]`` (this rank's n tokens, all heads) -> ``[B, H/world, world n, d]`` (all
    tokens of this rank's heads): one all-to-all."""
    b, h, n, d = x.shape
    send = x.reshape(b, world, h // world, n, d).permute(1, 0, 2, 3, 4).contiguous()
    got = _collective("all-to-all", group, world, rid, lambda: funcol.all_to_all_single(send, None, None, group))
    if not _traced(x):
        record(rid, "all_to_all", _nbytes(send) * (world - 1) // world)
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // world, world * n, d)


def _tokens_to_heads(x: torch.Tensor, group: str, world: int, rid: int) -> torch.Tensor:
    """The inverse of :func:`_heads_to_tokens`: ``[B, H/world, world n, d]`` -> ``[B, H, n, d]``."""
    b, hl, big_n, d = x.shape
    n = big_n // world
    send = x.reshape(b, hl, world, n, d).permute(2, 0, 1, 3, 4).contiguous()
    got = _collective("all-to-all", group, world, rid, lambda: funcol.all_to_all_single(send, None, None, group))
    if not _traced(x):
        record(rid, "all_to_all", _nbytes(send) * (world - 1) // world)
    return got.permute(1, 0, 2, 3, 4).reshape(b, world * hl, n, d)


def _to_full_sequence(x: torch.Tensor, segs: Segs, group: str, rank: int, world: int, rid: int) -> torch.Tensor:
    """This rank's heads over the whole (global) sequence of a ``[B, H, local, d]`` tensor."""
    hl = x.shape[1] // world
    out = []
    for piece, (kind, _) in zip(_pieces(x, 2, segs, world, local=True), segs):
        out.append(_heads_to_tokens(piece, group, world, rid) if kind == "s" else piece[:, rank * hl:(rank + 1) * hl])
    return torch.cat(out, dim=2) if len(out) > 1 else out[0]


def _mask_heads(mask: torch.Tensor | None, heads: int, rank: int, world: int) -> torch.Tensor | None:
    if mask is not None and mask.dim() >= 3 and mask.shape[-3] == heads:
        hl = heads // world
        return mask.narrow(-3, rank * hl, hl)
    return mask


def ulysses_attention(q, k, v, mask, scale, q_segs: Segs, kv_segs: Segs, group: str, rank: int, world: int,
                      rid: int) -> torch.Tensor:
    """Self-attention over the whole sequence from this rank's tokens (``[B, H, local, d]``):
    all-to-all (scatter heads, gather tokens) for q, k, v; attention of this rank's heads over
    every token; the inverse all-to-all. Replicated segments (text in joint attention) are cut
    to this rank's heads, and their output rows all-gathered over heads. ``mask`` is global."""
    heads = q.shape[1]
    if heads % world:
        raise ValueError(f"Ulysses attention needs the head count ({heads}) to divide the world size ({world})")
    qf, kf, vf = (_to_full_sequence(t, s, group, rank, world, rid) for t, s in ((q, q_segs), (k, kv_segs), (v, kv_segs)))
    out = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, attn_mask=_mask_heads(mask, heads, rank, world),
                                                           scale=scale)
    pieces = []
    for piece, (kind, _) in zip(_pieces(out, 2, q_segs, world, local=False), q_segs):
        if kind == "s":
            pieces.append(_tokens_to_heads(piece, group, world, rid))
        else:  # every rank computed these rows for its heads: gather the heads
            pieces.append(_all_gather(piece, 1, group, world, rid))
    return torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]


def _ring_pass(x: torch.Tensor, group: str, rank: int, world: int, rid: int) -> torch.Tensor:
    """Send ``x`` to the next rank and receive the previous rank's (one all-to-all with one
    non-empty split each way)."""
    flat = x.contiguous().reshape(-1)
    sizes_in, sizes_out = [0] * world, [0] * world
    sizes_in[(rank + 1) % world] = flat.numel()
    sizes_out[(rank - 1) % world] = flat.numel()
    got = _collective("ring pass", group, world, rid,
                      lambda: funcol.all_to_all_single(flat, sizes_out, sizes_in, group))
    if not _traced(x):
        record(rid, "ring", _nbytes(flat))
    return got.reshape(x.shape)


def _columns(segs: Segs, world: int, source: int | None) -> list[int]:
    """Global key positions of the replicated segments (``source`` None) or of rank ``source``'s
    slices of the sharded ones."""
    cols, offset = [], 0
    for kind, n in segs:
        if kind == "r" and source is None:
            cols.extend(range(offset, offset + n))
        elif kind == "s" and source is not None:
            cols.extend(range(offset + source * (n // world), offset + (source + 1) * (n // world)))
        offset += n
    return cols


def ring_attention(q, k, v, mask, scale, q_segs: Segs, kv_segs: Segs, group: str, rank: int, world: int,
                   rid: int, keep: dict | None = None) -> torch.Tensor:
    """Self-attention of this rank's queries over every rank's keys: the sharded part of K/V goes
    around the ring (``world - 1`` hops), one partial attention per block of keys, the partials
    merged by their log-sum-exp (:func:`merge_partials`). Any head count works. ``mask`` is
    global: its query rows are cut to this rank's, its key columns to each block's. ``keep`` (a
    dict) receives ``{source rank: [2, B, H, its sharded tokens, d]}``, the K/V blocks received."""
    if mask is not None and mask.shape[-2] > 1:
        mask = shard(mask, mask.dim() - 2, q_segs, rank, world)

    def cols(source):
        if mask is None or mask.shape[-1] == 1:
            return mask
        index = torch.tensor(_columns(kv_segs, world, source), device=mask.device)
        return mask.index_select(-1, index)

    k_pieces = _pieces(k, 2, kv_segs, world, local=True)
    v_pieces = _pieces(v, 2, kv_segs, world, local=True)
    kinds = [kind for kind, _ in kv_segs]
    parts = []
    if "r" in kinds:
        k_rep = torch.cat([p for p, kind in zip(k_pieces, kinds) if kind == "r"], dim=2)
        v_rep = torch.cat([p for p, kind in zip(v_pieces, kinds) if kind == "r"], dim=2)
        parts.append(attention_with_lse(q, k_rep, v_rep, cols(None), scale))
    if "s" in kinds:
        kv = torch.stack([torch.cat([p for p, kind in zip(pieces, kinds) if kind == "s"], dim=2)
                          for pieces in (k_pieces, v_pieces)])
        for hop in range(world):
            source = (rank - hop) % world
            if keep is not None and hop:
                keep[source] = kv
            parts.append(attention_with_lse(q, kv[0], kv[1], cols(source), scale))
            if hop < world - 1:
                kv = _ring_pass(kv, group, rank, world, rid)
    return merge_partials(parts)


def sp_attention(q, k, v, mask, scale, q_segs: Segs, kv_segs: Segs, mode: str, group: str, rank: int, world: int,
                 rid: int, graph: int = -1, site: str = "", call: str = "", refresh: float = -1.0,
                 forecast: str = "hold", residual: str = "none") -> torch.Tensor:
    """The distributed self-attention a sequence-parallel graph calls in place of SDPA. ``site``
    (the attention site holding this ``call``) and ``graph`` let a plan's ``stale_kv`` steps skip
    the exchange (:mod:`.stale_kv`: decided on the host from the static table, eager path only);
    ``refresh`` >= 0: ring stale steps refresh that share of the hops instead (DiTango);
    ``forecast="linear"`` / ``"quadratic"``: stale steps extrapolate the remote K/V from the last
    exchanges (``stale_kv.forecast_remote``); ``residual="fp16"`` / ``"int8"``: stale steps send
    each rank's K/V residual against that forecast at that precision (``stale_kv.residual_attention``)."""
    if site and not _traced(q):
        from . import stale_kv

        out = stale_kv.planned_attention(q, k, v, mask, scale, q_segs, kv_segs, mode, group, rank, world, rid, graph,
                                         site, call, refresh, forecast, residual)
        if out is not None:
            return out
    run = ulysses_attention if mode == "ulysses" else ring_attention
    return run(q, k, v, mask, scale, q_segs, kv_segs, group, rank, world, rid)


def attention_bytes(mode: str, k: torch.Tensor, world: int, residual: str = "none") -> tuple[int, int]:
    """``(exchange, stale)``: the bytes one rank sends for one call of distributed attention whose
    local keys are ``k`` (values alike): an exchange (ring: ``world - 1`` hops of K and V;
    Ulysses: the all-to-alls of q, K, V and of the output), and a ``stale_kv`` step (nothing, or
    the residual at ``residual``'s precision all-gathered: ``runtime.stale_kv.encode``).

    >>> attention_bytes("ring", torch.zeros(1, 2, 8, 32), 2, "int8")
    (4096, 1088)
    """
    b = k.numel() * k.element_size()
    exchange = 2 * b * (world - 1) if mode == "ring" else 4 * b * (world - 1) // world
    if residual == "none":
        return exchange, 0
    per = 2 if residual == "fp16" else 1 + 2 / k.shape[-1]  # int8 entries and a 2-byte scale per row
    return exchange, int(2 * k.numel() * per * (world - 1))


# Output shapes for shape propagation on fake tensors (the pass runs these instead: no collective).
def _fake_attention(q, k, v, *args):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _fake_gather(x, dim, segs, group, rank, world, rid):
    shape = list(x.shape)
    shape[dim] = sum(n for _, n in segs)
    return x.new_empty(shape)


sp_attention.fake = _fake_attention  # type: ignore[attr-defined]
gather.fake = _fake_gather  # type: ignore[attr-defined]


def world_of(group: dist.ProcessGroup | None) -> tuple[int, int, str]:
    """``(rank, world size, group name)`` of ``group`` (the default group when None)."""
    group = group if group is not None else dist.group.WORLD
    return dist.get_rank(group), dist.get_world_size(group), group.group_name


# -- across ranks: timeouts, failures, the same decisions everywhere ---------------------------

def timed_group(base: dist.ProcessGroup | None, seconds: float) -> dist.ProcessGroup:
    """A group of ``base``'s ranks (the default group when None) whose collectives give up after
    ``seconds``; made once per (group, seconds) by every rank of ``base`` (at compile time)."""
    base = base if base is not None else dist.group.WORLD
    key = (base.group_name, float(seconds))
    group = _GROUPS.get(key)
    if group is None or group not in dist.distributed_c10d._world.pg_names:  # destroyed with its parent
        group = _GROUPS[key] = dist.new_group(sorted(dist.get_process_group_ranks(base)), timeout=timedelta(
            seconds=seconds), backend=dist.get_backend(base), use_local_synchronization=True)
        _TIMEOUTS[group.group_name] = float(seconds)
    return group


def _collective(what: str, group: str, world: int, rid: int, issue: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``issue()``'s result waited for; a failure (a peer gone, or silent past the timeout) raises
    ``ERRORS["failure"]`` naming the peer rank and this rank's step (gloo's error names neither)."""
    try:
        return funcol.wait_tensor(issue())
    except RuntimeError as exc:
        raise ERRORS["failure"](_failure_message(str(exc), what, group, world, rid)) from exc


def _failure_message(text: str, what: str, group: str, world: int, rid: int) -> str:
    pg = dist.distributed_c10d._resolve_process_group(group)
    rank = dist.get_rank(pg)
    ranks = dist.get_process_group_ranks(pg)
    # Two ranks: the peer is the other one. More: gloo names the peer's address, not its rank.
    peer = f"rank {ranks[1 - rank]}" if world == 2 else "a peer rank (gloo's error gives its address, not its rank)"
    runtime = _RUNTIMES.get(rid)
    where = f"step {runtime.state.step} (CFG branch {runtime.state.branch})" if runtime is not None else "a step"
    timeout = _TIMEOUTS.get(group)
    if "timed out" in text.lower():
        why = (f"{peer} did not answer within the {f'{timeout:g} s ' if timeout else ''}timeout (it raised and "
               f"lives on, hangs, or runs another collective)")
    elif "closed" in text or "reset" in text or "onnection" in text:
        why = f"{peer} is gone: its connection closed (the process died or exited)"
    else:
        why = f"{peer} failed"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return (f"ditopt: sequence parallelism: {why}, during the {what} of {where} on rank {ranks[rank]}; this process "
            f"group cannot be used any more: end the process [{first[:300]}]")


def mean_over_ranks(x: torch.Tensor, group: str, world: int, rid: int) -> torch.Tensor:
    """The mean of ``x`` over the ranks (one all-reduce; the same bits on every rank)."""
    out = _collective("all-reduce", group, world, rid, lambda: funcol.all_reduce(x, "sum", group)) / world
    record(rid, "all_reduce", 2 * _nbytes(x) * (world - 1) // world)  # what a ring all-reduce sends
    return out


@torch.library.custom_op("ditopt::update_indicator_across", mutates_args=("token",))
def update_indicator_across(token: torch.Tensor, value: torch.Tensor, rid: int, graph: int, rule: int, group: str,
                            world: int) -> None:
    """``ditopt::update_indicator`` whose relative L1 change is averaged over the ranks first (the
    mean change and the mean magnitude, each rank holding an equal share of the tokens: the change
    of the whole tensor), on the device: every rank takes the same decision, no host read."""
    token.add_(1)
    get_runtime(rid).update_indicator(graph, rule, value.detach(),
                                      reduce=lambda parts: mean_over_ranks(parts, group, world, rid))


@update_indicator_across.register_fake
def _(token, value, rid, graph, rule, group, world):
    return None


_CODES = list(Action)


def _planned(table, site: str, step: int) -> int:
    row = table.adaptive.get(site)
    rule = row[step] if row is not None and 0 <= step < table.steps else None
    return _CODES.index(table.action(site, step)) + (0 if rule is None else 8 * (rule + 1))


def _taken(table, decisions: dict, sites: list[str]) -> list[int]:
    """One call's decisions as ``Runtime.decisions`` reports them (``when`` rules read now: a sync)."""
    call = {s: str(d[1] if bool(d[0]) else Action.COMPUTE) if isinstance(d, tuple) else str(d)
            for s, d in ((s, decisions.get(s, Action.COMPUTE)) for s in sites)}
    return [_CODES.index(Action(a)) for a in table.with_nested_skips(call).values()]


@torch.library.custom_op("ditopt::check_decisions", mutates_args=("token",))
def check_decisions(token: torch.Tensor, inputs: list[torch.Tensor], names: str, rid: int, graph: int, group: str,
                    world: int) -> None:
    """``SequenceParallel(check=True)``, at the start of every call (before any decision or other
    collective): all-gather the step, the CFG branch, a checksum of the plan's decisions at this
    step and of the previous call's decisions as taken (``when`` rules included: a host read), and
    one of the call's ``inputs`` (the forward's tensor arguments, ``names`` comma-separated: every
    rank must be given the same latents, timestep and conditioning); if any rank's differ,
    all-gather what differs and raise ``ERRORS["divergence"]`` on every rank, naming the step,
    the sites or the inputs, and the ranks."""
    token.add_(1)
    rt = get_runtime(rid)
    table, step, branch = rt.graphs[graph], rt.state.step, rt.state.branch
    sites = list(table.site_order or sorted(table.actions))
    taken = rt.records[-2].decisions if len(rt.records) > 1 else {}
    codes = [_planned(table, s, step) for s in sites] + _taken(table, taken, sites)
    sums = torch.stack([torch.stack([x.double().sum(), x.double().abs().sum()]) for x in inputs]).flatten() \
        if inputs else torch.zeros(0, dtype=torch.float64, device=token.device)
    head = [len(sites), step, branch, zlib.crc32(repr(codes).encode()), zlib.crc32(repr(sums.tolist()).encode())]
    rows = _check_gather(torch.tensor(head, device=token.device), group, world, rid)
    if all(r == rows[0] for r in rows):
        return
    if len({r[0] for r in rows}) > 1:
        raise ERRORS["divergence"](f"ditopt: sequence-parallel ranks compiled different graphs (sites per rank: "
                                   f"{[r[0] for r in rows]}) at step {step}")
    if all(r[:4] == rows[0][:4] for r in rows):
        raise ERRORS["divergence"](_inputs_differ(step, names.split(","), _check_gather(sums, group, world, rid)))
    per_rank = _check_gather(torch.tensor(codes, device=token.device), group, world, rid)
    raise ERRORS["divergence"](_divergence(rows, per_rank, sites))


@check_decisions.register_fake
def _(token, inputs, names, rid, graph, group, world):
    return None


def _inputs_differ(step: int, names: list[str], sums: list[list[float]]) -> str:
    """The message of ranks called with different inputs: which ones, and their sums per rank."""
    differ = [j for j, name in enumerate(names) if len({tuple(r[2 * j:2 * j + 2]) for r in sums}) > 1]
    shown = "; ".join(f"{names[j]} (sum " + ", ".join(f"rank {i} {r[2 * j]:.6g}" for i, r in enumerate(sums)) + ")"
                      for j in differ)
    return (f"ditopt: sequence-parallel ranks were called with different inputs at step {step}: {shown}. Every "
            f"rank must call the model with the same inputs (each computes a slice of the same tokens): draw the "
            f"noise from a generator seeded alike on every rank, and give each the same conditioning")


def _check_gather(x: torch.Tensor, group: str, world: int, rid: int) -> list[list[int]]:
    out = _collective("decision check", group, world, rid, lambda: funcol.all_gather_single(x, 0, group))
    record(rid, "check", _nbytes(x) * (world - 1))
    return out.view(world, -1).tolist()


def _divergence(rows: list[list[int]], codes: list[list[int]], sites: list[str]) -> str:
    """The message of a diverged schedule: where the ranks are, and which sites they disagree on."""
    def name(code: int) -> str:
        return str(_CODES[code % 8]) + (f" (when rule {code // 8 - 1})" if code >= 8 else "")

    parts, n = [], len(sites)
    if len({(r[1], r[2]) for r in rows}) > 1:
        parts.append("they are at different steps: " + ", ".join(f"rank {i} at step {r[1]} (CFG branch {r[2]})"
                                                                  for i, r in enumerate(rows)))
    for offset, label in ((0, "planned at this step"), (n, "taken at the call before")):
        differ = [j for j in range(n) if len({c[offset + j] for c in codes}) > 1]
        if differ:
            shown = "; ".join(f"{sites[j]}: " + ", ".join(f"rank {i} {name(c[offset + j])}" for i, c in enumerate(codes))
                              for j in differ[:4])
            parts.append(f"decisions {label}: {shown}" + (f" (and {len(differ) - 4} more sites)" if len(differ) > 4
                                                           else ""))
    ranks = [i for i, r in enumerate(rows) if r != rows[0]]
    return (f"ditopt: sequence-parallel ranks diverged at step {rows[0][1]} (rank 0's; CFG branch {rows[0][2]}): "
            f"rank 0 and rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} disagree: "
            f"{'; '.join(parts)}. Every rank must run the same plan and be told the same steps, or their collectives "
            f"pair with the wrong layers")


__all__ = ["ERRORS", "KINDS", "attention_with_lse", "check_decisions", "gather", "local_length", "mean_over_ranks",
           "merge_partials", "record", "ring_attention", "shard", "slice_layout", "sp_attention", "timed_group",
           "ulysses_attention", "update_indicator_across", "world_of"]
