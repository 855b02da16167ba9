"""``action: stale_kv``: self-attention under sequence parallelism that skips its K/V exchange
(DistriFusion's stale activations).

A ``stale_kv`` step of a self- (or joint) attention site attends with this step's **local** K/V (fresh: this
rank computed them) and the **remote** K/V kept from the last step the site exchanged them, and
sends nothing. ``runtime.distributed.sp_attention`` asks :func:`plan_at` what to do at each call
(the table is static, so every rank decides alike, from the step alone):

- ``"stale"``: a ``stale_kv`` step with remote K/V kept: :func:`stale_attention`, no collective.
- ``"keep"``: an exchange step that a later ``stale_kv`` step of the site needs (one comes before
  the site surely exchanges again, :func:`needed_later`): exchange, and keep the remote K/V in the
  runtime's cache store, keyed ``(graph, site, "stale_kv:<call>", branch)`` like every other cache
  (``stats().cache_bytes`` counts them: ``2 B H (N - N/world) d`` elements per attention call).
- ``"exchange"``: the plain distributed attention.

What is kept, per mode:

- **ring**: the remote K/V pass through the rank anyway (``world - 1`` hops); the blocks it receives
  are kept. A keeping step sends what a ring step sends.
- **Ulysses**: an all-to-all step holds the whole sequence of ``H / world`` heads only, and a stale
  step needs every head of the remote tokens (it sends nothing, so its queries stay local with all
  heads). So a keeping step all-gathers K and V over the ranks instead (ring-equivalent: the
  sharded tokens of every head) and attends with this rank's queries over the gathered keys: the
  same result as Ulysses; no all-to-all of q or of the output. Bytes per attention, ``b`` the bytes
  of one rank's K (all heads): Ulysses ``4 b (world-1)/world``, a keeping step ``2 b (world-1)`` --
  equal at 2 ranks, ``world/2`` times Ulysses above.

A stale step of either mode is one attention of the local queries over the assembled global K/V
(local slices fresh, the replicated text tokens fresh, the other ranks' slices kept).

Example (two ranks' K of 4 sharded tokens each; rank 0 keeps rank 1's and assembles):
    >>> import torch
    >>> full = torch.arange(8.0).view(1, 1, 1, 8, 1).expand(2, 1, 1, 8, 1)
    >>> remote = remote_of(full, (("s", 8),), rank=0, world=2)
    >>> remote[0].flatten().tolist()
    [4.0, 5.0, 6.0, 7.0]
    >>> assemble(torch.zeros(2, 1, 1, 4, 1), remote, (("s", 8),), rank=0, world=2)[0].flatten().tolist()
    [0.0, 0.0, 0.0, 0.0, 4.0, 5.0, 6.0, 7.0]
"""

from __future__ import annotations

import torch

from .decisions import Action, DecisionTable
from .session import _RUNTIMES

SLOT = "stale_kv"  # SLOTS[Action.STALE_KV]
# runtime id -> a callable (site, call, q, k, v) that sp_attention feeds this rank's q, K, V at every call
# (ditopt.stale_plan.profile_kv: the K/V change map)
RECORDERS: dict = {}

Segs = tuple[tuple[str, int], ...]


def needed_later(table: DecisionTable, site: str, step: int) -> bool:
    """Whether remote K/V exchanged by ``site`` at ``step`` are read by a later ``stale_kv`` step:
    one comes before the site next exchanges for sure (a computing step inside sites that all run
    then). A later step inside a reusing block does not run the site at all."""
    running = table.running()
    for later in range(step + 1, table.steps):
        action = table.action(site, later)
        if action == Action.STALE_KV:
            return True
        if action == Action.COMPUTE and all(table.action(p, later) in running for p in table.parents.get(site, ())):
            return False
    return False


def plan_at(rid: int, graph: int, site: str, call: str) -> tuple[str, object | None]:
    """``("stale" | "keep" | "exchange", the kept remote K/V or None)`` for this call of ``site``.
    A ``stale_kv`` step with nothing kept (a new generation, or a shape change) exchanges."""
    rt = _RUNTIMES.get(rid)
    table = rt.graphs.get(graph) if rt is not None else None
    if table is None or site not in table.actions:
        return "exchange", None
    step = rt.state.step
    if table.action(site, step) == Action.STALE_KV:
        entry = rt.store.latest(rt.key(graph, site, f"{SLOT}:{call}"))
        if entry is not None:
            rt._record(site, Action.STALE_KV)
            return "stale", entry.value
        rt._record(site, Action.COMPUTE)
    return ("keep" if needed_later(table, site, step) else "exchange"), None


def planned_attention(q, k, v, mask, scale, q_segs: Segs, kv_segs: Segs, mode: str, group: str, rank: int,
                      world: int, rid: int, graph: int, site: str, call: str,
                      refresh: float = -1.0, forecast: str = "hold", residual: str = "none") -> torch.Tensor | None:
    """What ``sp_attention`` runs for a call of ``site``: the stale attention, or a keeping exchange
    (ring: the blocks received are kept; Ulysses: K/V all-gathered); None for a plain exchange.
    ``refresh`` >= 0 (ring, ``SequenceParallel(ring_refresh=)``): DiTango's selective refresh
    (:func:`refreshed_attention`) in place of stale K/V. ``forecast="linear"``: a stale step
    extrapolates the remote K/V from the last two exchanges (``"quadratic"``: three;
    :func:`forecast_remote`). ``residual`` not ``"none"``: a stale step sends the residual against
    that forecast (:func:`residual_attention`); every exchange before one keeps this rank's own K/V."""
    from .distributed import ring_attention

    if rid in RECORDERS:
        RECORDERS[rid](site, call, q, k, v)
    what, remote = plan_at(rid, graph, site, call)
    order = ORDERS.get(forecast, 0)
    if what == "exchange" and (order or residual != "none") and _stale_after(rid, graph, site):
        what = "keep"  # every exchange before a stale step is kept: the forecast reads the last ones
    if refresh >= 0 and mode == "ring" and what != "exchange":
        return refreshed_attention(q, k, v, mask, scale, q_segs, kv_segs, group, rank, world, rid, graph, site, call,
                                   refresh, remote if what == "stale" else None)
    if what == "stale" and residual != "none":
        return residual_attention(q, k, v, mask, scale, q_segs, kv_segs, group, rank, world, rid, graph, site, call,
                                  order, residual)
    if what == "stale":
        if order:
            remote = forecast_remote(rid, graph, site, call, ORDERS[forecast])
        return stale_attention(q, k, v, mask, scale, q_segs, kv_segs, rank, world, remote)
    if what == "keep" and mode == "ulysses":
        out, remote = gathered_attention(q, k, v, mask, scale, q_segs, kv_segs, group, rank, world, rid)
    elif what == "keep":
        blocks: dict = {}
        out = ring_attention(q, k, v, mask, scale, q_segs, kv_segs, group, rank, world, rid, keep=blocks)
        remote = remote_from_ring(blocks, kv_segs, rank, world) if blocks else torch.stack([k, v])[..., :0, :]
    else:
        return None
    keep(rid, graph, site, call, remote, previous=order)
    if residual != "none":
        keep(rid, graph, site, f"{call}:mine", _own(k, v, kv_segs, world), previous=order)
    return out


def _stale_after(rid: int, graph: int, site: str) -> bool:
    rt = _RUNTIMES.get(rid)
    table = rt.graphs.get(graph) if rt is not None else None
    return table is not None and site in table.actions and any(
        table.action(site, s) == Action.STALE_KV for s in range(rt.state.step + 1, table.steps))


ORDERS = {"hold": 0, "linear": 1, "quadratic": 2}  # stale_forecast -> polynomial order (earlier exchanges kept)


def keep(rid: int, graph: int, site: str, call: str, remote: torch.Tensor, previous: int = 0) -> None:
    """Keep ``remote`` (``[2, B, H, remote tokens, d]``) as this step's remote K/V of ``site``;
    ``previous``: that many earlier exchanges are kept too (keys ``<call>:prev1``, ...; one more
    copy each), the older ones shifted down."""
    rt = _RUNTIMES[rid]
    keys = [rt.key(graph, site, f"{SLOT}:{call}" + (f":prev{i}" if i else "")) for i in range(previous + 1)]
    last = rt.store.latest(keys[0])
    if previous and last is not None and last.step != rt.state.step:
        for i in range(previous, 0, -1):
            entry = rt.store.latest(keys[i - 1])
            if entry is not None:
                rt.store.put(keys[i], entry.step, entry.value)
    rt.store.put(keys[0], rt.state.step, remote.detach())


def forecast_remote(rid: int, graph: int, site: str, call: str, order: int = 1) -> torch.Tensor:
    """The remote K/V at this step extrapolated (in steps) by the polynomial of degree ``order``
    through the last ``order + 1`` exchanges (Lagrange; linear: ``b + (step - s_b) / (s_b - s_a)
    (b - a)``); through fewer while fewer are kept (the last one as is). Nothing is sent.

    >>> from ditopt.runtime.session import Runtime
    >>> rt = Runtime()
    >>> for step, value in ((1, 1.0), (2, 4.0), (3, 9.0)):
    ...     rt.state.step = step
    ...     keep(rt.id, 0, "a", "c", torch.full((1,), value), previous=2)
    >>> rt.state.step = 4
    >>> forecast_remote(rt.id, 0, "a", "c", order=1).tolist(), forecast_remote(rt.id, 0, "a", "c", order=2).tolist()
    ([14.0], [16.0])
    """
    rt = _RUNTIMES[rid]
    points = []
    for i in range(order + 1):
        entry = rt.store.latest(rt.key(graph, site, f"{SLOT}:{call}" + (f":prev{i}" if i else "")))
        if entry is None or (points and (entry.value.shape != points[0].value.shape or entry.step >= points[-1].step)):
            break
        points.append(entry)
    t, out = rt.state.step, 0
    for i, p in enumerate(points):
        w = 1.0
        for j, other in enumerate(points):
            if j != i:
                w *= (t - other.step) / (p.step - other.step)
        out = out + w * p.value
    return out


def remote_of(full: torch.Tensor, segs: Segs, rank: int, world: int) -> torch.Tensor:
    """The other ranks' tokens of every sharded segment of a global ``[..., tokens, d]`` tensor,
    in segment order, rank order within a segment (this rank's slice and replicated runs left out)."""
    pieces = torch.split(full, [n for _, n in segs], dim=-2)
    out = []
    for piece, (kind, n) in zip(pieces, segs):
        if kind == "s":
            m = n // world
            out += [piece[..., : rank * m, :], piece[..., (rank + 1) * m:, :]]
    return torch.cat(out, dim=-2)


def remote_from_ring(blocks: dict[int, torch.Tensor], segs: Segs, rank: int, world: int) -> torch.Tensor:
    """:func:`remote_of` from the blocks a ring step received: ``{source rank: [..., its sharded
    tokens of every segment, d]}``."""
    local = [n // world for kind, n in segs if kind == "s"]
    split = {src: torch.split(b, local, dim=-2) for src, b in blocks.items()}
    out = []
    for j in range(len(local)):
        out += [split[src][j] for src in range(world) if src != rank]
    return torch.cat(out, dim=-2)


def assemble(local: torch.Tensor, remote: torch.Tensor, segs: Segs, rank: int, world: int) -> torch.Tensor:
    """The global ``[..., tokens, d]`` tensor from this rank's local part (fresh) and ``remote``
    (kept): the inverse of :func:`remote_of` with the local slices put back."""
    local_pieces = torch.split(local, [n // world if kind == "s" else n for kind, n in segs], dim=-2)
    remote_pieces = iter(torch.split(remote, [n - n // world for kind, n in segs if kind == "s"], dim=-2))
    out = []
    for piece, (kind, n) in zip(local_pieces, segs):
        if kind == "s":
            other = next(remote_pieces)
            m = n // world
            out += [other[..., : rank * m, :], piece, other[..., rank * m:, :]]
        else:
            out.append(piece)
    return torch.cat(out, dim=-2)


def _rows(mask: torch.Tensor | None, q_segs: Segs, rank: int, world: int) -> torch.Tensor | None:
    """A global mask cut to this rank's query rows (a broadcast row is kept)."""
    from .distributed import shard

    if mask is not None and mask.dim() >= 2 and mask.shape[-2] > 1:
        return shard(mask, mask.dim() - 2, q_segs, rank, world)
    return mask


def stale_attention(q, k, v, mask, scale, q_segs: Segs, kv_segs: Segs, rank: int, world: int,
                    remote: torch.Tensor) -> torch.Tensor:
    """This rank's queries (all heads) over the global K/V: local (fresh) and ``remote`` (kept)."""
    kf = assemble(k, remote[0], kv_segs, rank, world)
    vf = assemble(v, remote[1], kv_segs, rank, world)
    return torch.nn.functional.scaled_dot_product_attention(q, kf, vf, attn_mask=_rows(mask, q_segs, rank, world),
                                                            scale=scale)


def gathered_attention(q, k, v, mask, scale, q_segs: Segs, kv_segs: Segs, group: str, rank: int, world: int,
                       rid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ulysses at a keeping step: K and V all-gathered (every head), this rank's queries over them;
    returns the output and the remote K/V to keep."""
    from .distributed import gather

    full = gather(torch.stack([k, v]), 3, kv_segs, group, rank, world, rid)
    out = torch.nn.functional.scaled_dot_product_attention(q, full[0], full[1], attn_mask=_rows(mask, q_segs, rank,
                                                                                                   world), scale=scale)
    return out, remote_of(full, kv_segs, rank, world)


# -- CompactFusion's residual compression: a stale step sends the forecast's miss, compressed --

def _own(k: torch.Tensor, v: torch.Tensor, segs: Segs, world: int) -> torch.Tensor:
    """This rank's tokens of every sharded segment of its local K and V: ``[2, B, H, m, d]`` (the
    block a ring hop carries; the replicated runs are computed alike on every rank)."""
    from . import distributed as d

    kinds = [kind for kind, _ in segs]
    return torch.stack([torch.cat([p for p, kind in zip(d._pieces(t, 2, segs, world, local=True), kinds) if kind == "s"],
                                  dim=2) for t in (k, v)])


def encode(r: torch.Tensor, kind: str) -> torch.Tensor:
    """``r`` at the precision ``kind`` names, as one tensor to send: fp16 as is; int8 with each
    row's scale (``amax / 127``, bf16: no row too small for it) appended as two more int8 entries
    of the row. Inverse: :func:`decode` (an int8 entry is within half its row's scale).

    >>> r = torch.tensor([[0.5, -1.0, 0.25]])
    >>> [round(x, 4) for x in decode(encode(r, "int8"), "int8", torch.float32)[0].tolist()]
    [0.5039, -0.9999, 0.252]
    """
    if kind == "fp16":
        return r.half()
    scale = (r.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-30).bfloat16()
    q = torch.round(r / scale.float()).clamp(-127, 127).to(torch.int8)
    return torch.cat([q, scale.view(torch.int8)], dim=-1)


def decode(payload: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """What :func:`encode` sent, back at ``dtype``."""
    if kind == "fp16":
        return payload.to(dtype)
    scale = payload[..., -2:].flatten().clone().view(torch.bfloat16).view(*payload.shape[:-1], 1)
    return (payload[..., :-2].float() * scale.float()).to(dtype)


def residual_attention(q, k, v, mask, scale, q_segs: Segs, kv_segs: Segs, group: str, rank: int, world: int,
                       rid: int, graph: int, site: str, call: str, order: int, kind: str) -> torch.Tensor:
    """A stale step that sends, instead of nothing, each rank's K/V minus the forecast every rank
    makes of them from the same kept history (:func:`forecast_remote`: the remote ranks' under
    ``call``, this rank's own under ``<call>:mine``), encoded at ``kind`` (one all-gather). Each
    rank adds the decoded residuals to its forecast and keeps the result as that step's K/V, so
    every rank's history of a rank's K/V is the same tensor and the next forecast agrees; the
    local K/V attended are this step's own (fresh)."""
    from .distributed import _all_gather

    own = _own(k, v, kv_segs, world)
    if world == 1:  # nothing is remote: the local K/V are all there is
        return stale_attention(q, k, v, mask, scale, q_segs, kv_segs, rank, world, own[..., :0, :])
    mine = forecast_remote(rid, graph, site, f"{call}:mine", order)
    remote = forecast_remote(rid, graph, site, call, order)
    got = _all_gather(encode(own - mine, kind), 3, group, world, rid)
    blocks = dict(enumerate(decode(got, kind, own.dtype).chunk(world, dim=3)))
    keep(rid, graph, site, f"{call}:mine", mine + blocks[rank], previous=order)
    remote = remote + remote_from_ring(blocks, kv_segs, rank, world)
    keep(rid, graph, site, call, remote, previous=order)
    return stale_attention(q, k, v, mask, scale, q_segs, kv_segs, rank, world, remote)


# -- DiTango's selective refresh of ring hops ---------------------------------------------------

def refresh_hops(share: float, step: int, world: int) -> list[int]:
    """The ring hops a stale step refreshes (hop ``h`` brings rank ``r - h``'s K/V to rank ``r``):
    ``round(share (world - 1))`` of the ``world - 1``, taken in turn as the steps go (the same on
    every rank: from the step alone).

    >>> [refresh_hops(0.5, step, 5) for step in (1, 2, 3)]
    [[3, 4], [1, 2], [3, 4]]
    >>> refresh_hops(0.0, 3, 4), refresh_hops(1.0, 3, 4)
    ([], [1, 2, 3])
    """
    n = world - 1
    m = min(n, int(share * n + 0.5))
    start = (step * m) % n if n else 0
    return sorted({(start + i) % n + 1 for i in range(m)})


def _hop_exchange(kv: torch.Tensor, hops: list[int], group: str, rank: int, world: int, rid: int) -> dict:
    """``{h: rank r - h's kv}`` for each hop in ``hops``: each rank sends its block straight to the
    ranks ``r + h`` (one all-to-all; the bytes of ``len(hops)`` ring hops, counted as ``ring``)."""
    from . import distributed as d

    flat = kv.contiguous().reshape(-1)
    n, send, recv = flat.numel(), [0] * world, [0] * world
    for h in hops:
        send[(rank + h) % world], recv[(rank - h) % world] = n, n
    got = d._collective("selective ring refresh", group, world, rid,
                        lambda: d.funcol.all_to_all_single(flat.repeat(len(hops)), recv, send, group))
    if not d._traced(kv):
        d.record(rid, "ring", n * flat.element_size() * len(hops))
    sources = sorted((rank - h) % world for h in hops)
    blocks = dict(zip(sources, got.split(n)))
    return {h: blocks[(rank - h) % world].reshape(kv.shape) for h in hops}


def refreshed_attention(q, k, v, mask, scale, q_segs: Segs, kv_segs: Segs, group: str, rank: int, world: int,
                        rid: int, graph: int, site: str, call: str, share: float, cached) -> torch.Tensor:
    """Ring attention that refreshes some hops: the local block and the replicated tokens are fresh;
    the hops :func:`refresh_hops` picks at a stale step (``cached``: the partials kept) are received
    and attended; the others reuse the partial ``(output, lse)`` kept from the step they were last
    refreshed (sending nothing). ``cached`` None (a keeping step): every hop is refreshed (a ring
    step's bytes and result). The partials are kept in the runtime's store (``stats().cache_bytes``)."""
    from . import distributed as d

    rt = _RUNTIMES[rid]
    if mask is not None and mask.shape[-2] > 1:
        mask = d.shard(mask, mask.dim() - 2, q_segs, rank, world)

    def cols(source):
        if mask is None or mask.shape[-1] == 1:
            return mask
        return mask.index_select(-1, torch.tensor(d._columns(kv_segs, world, source), device=mask.device))

    kinds = [kind for kind, _ in kv_segs]
    k_pieces, v_pieces = (d._pieces(t, 2, kv_segs, world, local=True) for t in (k, v))
    parts = []
    if "r" in kinds:
        rep = [torch.cat([p for p, kind in zip(pieces, kinds) if kind == "r"], dim=2) for pieces in (k_pieces, v_pieces)]
        parts.append(d.attention_with_lse(q, rep[0], rep[1], cols(None), scale))
    kv = _own(k, v, kv_segs, world)
    parts.append(d.attention_with_lse(q, kv[0], kv[1], cols(rank), scale))
    hops = list(range(1, world)) if cached is None else refresh_hops(share, rt.state.step, world)
    got = _hop_exchange(kv, hops, group, rank, world, rid) if hops else {}
    outs = list(cached.unbind(0)) if cached is not None else [None] * (world - 1)
    lses = list(_latest(rid, graph, site, f"{call}:lse").unbind(0)) if cached is not None else [None] * (world - 1)
    for h in range(1, world):
        if h in got:
            outs[h - 1], lses[h - 1] = d.attention_with_lse(q, got[h][0], got[h][1], cols((rank - h) % world), scale)
        parts.append((outs[h - 1], lses[h - 1]))
    if got:
        keep(rid, graph, site, call, torch.stack(outs))
        keep(rid, graph, site, f"{call}:lse", torch.stack(lses))
    return d.merge_partials(parts)


def _latest(rid: int, graph: int, site: str, call: str) -> torch.Tensor:
    rt = _RUNTIMES[rid]
    return rt.store.latest(rt.key(graph, site, f"{SLOT}:{call}")).value


__all__ = ["ORDERS", "RECORDERS", "SLOT", "decode", "encode", "forecast_remote", "residual_attention", "refresh_hops", "refreshed_attention", "assemble", "gathered_attention", "keep", "needed_later", "plan_at", "planned_attention", "remote_from_ring",
           "remote_of", "stale_attention"]
