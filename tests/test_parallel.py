"""Sequence parallelism (issue 14): the token-flow check on synthetic graphs, the attention merge,
and (slow) spawned gloo ranks whose outputs equal the single-process run.

The multi-process tests run every job once (``tests/parallel_worker.py``: 2 ranks, the small
configs of every class, Ulysses and ring, FORA-2) and read the results from one fixture.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import ditopt
from ditopt.capture import capture
from ditopt.passes.sequence_parallel import find_token_flow
from ditopt.runtime import distributed

# -- synthetic graphs: what the token-flow check accepts and refuses --------------------------


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mix: str | None):
        super().__init__()
        self.heads, self.mix = heads, mix
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.conv = nn.Conv1d(dim, dim, 3, padding=1)

    def forward(self, x, rope):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, -1)
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        q, k = q * rope, k * rope  # a per-token table, [tokens, head dim]
        x = x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        if self.mix == "mean":
            x = x - x.mean(dim=1, keepdim=True)
        if self.mix == "conv":
            x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        return x + self.ff(x)


class Net(nn.Module):
    def __init__(self, mix: str | None = None, dim: int = 16, heads: int = 2, tokens: int = 8, out: int = 4):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.rope = nn.Parameter(torch.randn(tokens, dim // heads))
        self.blocks = nn.ModuleList(Block(dim, heads, mix) for _ in range(2))
        self.head = nn.Linear(dim, out)

    def forward(self, x, timestep):
        h = self.embed(x)
        rope = torch.cos(self.rope * timestep.float().mean())
        for block in self.blocks:
            h = block(h, rope)
        return self.head(h)


def _flow(model: nn.Module, world: int = 2):
    cap = capture(model, torch.randn(1, 8, 4), torch.tensor([10.0]))
    return find_token_flow(cap.gm.graph, ditopt.find_sites(cap.gm.graph), world), cap.gm


def test_token_flow_finds_the_token_dim_the_per_token_table_and_the_gather():
    flow, _ = _flow(Net())
    assert flow.dim == 1 and len(flow.attention) == 2
    assert {operand.name for _, operand, _, _ in flow.shards} == {"rope"}  # the table, sharded once per use
    # the head projects 16 channels to 4 per token: it runs sharded and its output is gathered
    assert [g.target for g in flow.gathers] == [torch._C._nn.linear] and len(flow.tail) == 1
    assert [u.op for g in flow.gathers for u in g.users] == ["output"]
    sizes = [args[1:] for node, (args, _) in flow.new_args.items() if node.target == "view"]
    assert sizes and all(s[1] == 4 for s in sizes)  # view(b, 8, heads, d) -> view(b, 4, heads, d)


def test_linear_attention_is_refused_naming_its_matmul_over_the_tokens():
    from diffusers import SanaTransformer2DModel  # ReLU linear attention: K^T V sums over the tokens

    torch.manual_seed(0)
    model = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                   num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                   cross_attention_dim=16, caption_channels=16, sample_size=8, patch_size=1).eval()
    cap = capture(model, hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 5, 16),
                  timestep=torch.tensor([500]))
    with pytest.raises(ditopt.CaptureError, match=r"node \S*scores \(matmul\): a matmul that contracts over the "
                                                  r"tokens \(following dimension 1 of hidden_states \(64 entries\)\)"):
        find_token_flow(cap.gm.graph, ditopt.find_sites(cap.gm.graph), 2)


def test_a_head_that_widens_the_tokens_reads_the_gathered_stack_output():
    flow, _ = _flow(Net(out=64))  # gathering after the head would move 4x the elements
    assert [u.target for g in flow.gathers for u in g.users] == [torch._C._nn.linear] and not flow.tail


@pytest.mark.parametrize("mix, node", [("mean", "mean"), ("conv", "conv1d")])
def test_token_flow_refuses_what_mixes_tokens_naming_the_node(mix, node):
    with pytest.raises(ditopt.CaptureError, match=rf"cannot shard the tokens: node {node}") as err:
        _flow(Net(mix))
    assert "only self-attention may mix tokens" in str(err.value)


def test_layout_slices_map_to_local_positions():
    joint = (("r", 6), ("s", 48))
    assert distributed.slice_layout(joint, slice(6, None), 2) == ((("s", 48),), slice(6, None))
    assert distributed.slice_layout(joint, slice(None, 6), 2) == ((("r", 6),), slice(None, 6))
    assert distributed.slice_layout((("s", 48), ("r", 6)), slice(48, None), 2) == ((("r", 6),), slice(24, None))
    assert distributed.slice_layout(joint, slice(10, None), 2) is None  # inside the sharded run
    x = torch.arange(54).reshape(1, 54)
    assert distributed.shard(x, 1, joint, 1, 2).tolist()[0] == [*range(6), *range(30, 54)]


@pytest.mark.parametrize("masked", [False, True])
def test_partial_attentions_merge_by_log_sum_exp_to_full_attention(masked):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 12, 8), torch.randn(2, 3, 12, 8)
    mask = torch.randn(2, 1, 5, 12) if masked else None
    parts = [distributed.attention_with_lse(q, k[:, :, c], v[:, :, c], None if mask is None else mask[..., c], None)
             for c in (slice(0, 4), slice(4, 10), slice(10, 12))]
    full = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (distributed.merge_partials(parts) - full).abs().max() < 1e-6


def test_sequence_parallel_needs_a_process_group_and_a_known_mode():
    with pytest.raises(ditopt.PlanError, match="mode 'tensor'"):
        ditopt.SequenceParallel(mode="tensor")
    if not dist.is_initialized():
        with pytest.raises(ditopt.PlanError, match="initialised process group"):
            ditopt.SequenceParallel().resolve()


@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_one_rank_rewrite_runs_and_equals_the_model(one_rank, mode):
    torch.manual_seed(0)
    model = Net().eval()
    x, t = torch.randn(1, 8, 4), torch.tensor([10.0])
    fast = ditopt.optimize(model, ditopt.presets.fora(interval=2, steps=2, level="block"),
                           parallel=ditopt.SequenceParallel(mode=mode))
    with torch.no_grad():
        assert (fast(x, t) - model(x, t)).abs().max() < 1e-6
    report = dict(ditopt.compiled_graph(fast).report)
    assert report["sequence_parallel"] is True
    assert ditopt.stats(fast).comm_bytes.get("total", 0) == 0  # one rank sends nothing


# -- spawned ranks (slow) ---------------------------------------------------------------------

MODELS = ["dit", "pixart", "cogvideox", "wan", "hunyuan"]
ZOO = ["dit-digits", "wan-digits"]  # trained: 2 CFG steps of sampling, each call compared on the same inputs
JOBS = [*({"model": m, "mode": mode} for m in MODELS for mode in ("ulysses", "ring")),
        {"model": "dit3", "mode": "ring"}, {"model": "dit3", "mode": "ulysses"},
        {"model": "dit", "mode": "ulysses", "plan": "fora2", "steps": 4},
        {"model": "wan", "mode": "ring", "plan": "fora2", "steps": 4},
        {"model": "dit", "mode": "ring", "plan": "fora2", "steps": 2, "compile": True},
        *({"model": z, "mode": mode} for z in ZOO for mode in ("ulysses", "ring"))]
# 4 ranks: the small configs have 2 heads (ring: heads that do not divide the world; Ulysses on a
# 4-head build of each config, and refused on 2 heads), the zoo models have 4.
JOBS4 = [*({"model": m, "mode": "ring"} for m in MODELS), *({"model": m, "mode": "ulysses", "heads": 4} for m in MODELS),
         {"model": "dit3", "mode": "ring"}, {"model": "dit", "mode": "ulysses"},
         *({"model": z, "mode": mode} for z in ZOO for mode in ("ulysses", "ring")),
         # DiTango's selective refresh (tests/test_stale_kv.py has the 2-rank cases): 2 of 3 hops a stale step
         {"stale": True, "mode": "ring", "steps": 4, "layers": 2, "refresh": 0.5, "name": "refresh-half"}]


def _key(r: dict) -> tuple:
    if r.get("stale"):
        return ("stale", r["name"])
    return (r["model"], r["mode"], r.get("plan", "all"), *(["compiled"] if r.get("compile") else []),
            *([f"heads{r['heads']}"] if r.get("heads") else []))


@pytest.fixture(scope="module")
def spawned():
    from parallel_worker import spawn

    return {_key(r): r for r in spawn(JOBS, world=2)}


@pytest.fixture(scope="module")
def spawned4():
    from parallel_worker import spawn

    return {_key(r): r for r in spawn(JOBS4, world=4)}


def _ok(result: dict) -> dict:
    assert "error" not in result, result.get("trace", result.get("error"))
    return result


@pytest.mark.slow
def test_all_compute_parallel_output_equals_single_process(spawned):
    for model in MODELS:
        for mode in ("ulysses", "ring"):
            result = _ok(spawned[(model, mode, "all")])
            assert result["max_diff"] <= 1e-5, (model, mode, result["max_diff"])
            assert result["comm_bytes"]["total"] > 0


@pytest.mark.slow
def test_zoo_models_parallel_output_equals_single_process(spawned):
    for model in ZOO:
        for mode in ("ulysses", "ring"):
            result = _ok(spawned[(model, mode, "all")])
            assert result["calls"] >= 2 and result["max_diff"] <= 1e-5, (model, mode, result["max_diff"])
            assert result["comm_bytes"]["total"] > 0


@pytest.mark.slow
def test_four_ranks_equal_single_process_on_every_class_and_the_zoo(spawned4):
    for model in [*MODELS, "dit3", *ZOO]:  # ring: 2 or 3 heads (or 4) over 4 ranks
        result = _ok(spawned4[(model, "ring", "all")])
        assert result["max_diff"] <= 1e-5, (model, "ring", result["max_diff"])
        assert result["comm_bytes"]["ring"] > 0
    for key in [*((m, "ulysses", "all", "heads4") for m in MODELS), *((z, "ulysses", "all") for z in ZOO)]:
        result = _ok(spawned4[key])
        assert result["max_diff"] <= 1e-5 and result["comm_bytes"]["all_to_all"] > 0, (key, result["max_diff"])
    dit = _ok(spawned4[("dit", "ring", "all")])
    assert dit["comm_bytes"] == {**_dit_bytes("ring", world=4), "total": sum(_dit_bytes("ring", world=4).values())}
    refused = spawned4[("dit", "ulysses", "all")]
    assert "PlanError" in refused["error"] and "2 heads" in refused["error"] and "4 ranks" in refused["error"]


@pytest.mark.slow
def test_ring_takes_a_head_count_the_world_size_does_not_divide_and_ulysses_refuses_it(spawned):
    assert _ok(spawned[("dit3", "ring", "all")])["max_diff"] <= 1e-5
    refused = spawned[("dit3", "ulysses", "all")]
    assert "PlanError" in refused["error"] and "3 heads" in refused["error"] and "mode='ring'" in refused["error"]
    assert "attention in transformer_blocks.0.attn1 has 3 heads" in refused["error"]  # the module, not a node


def _dit_bytes(mode: str, world: int = 2, batch: int = 2, heads: int = 2, head_dim: int = 16, layers: int = 3,
               tokens: int = 16, itemsize: int = 4) -> dict[str, int]:
    """Bytes one rank sends per all-compute call of the small DiT, from its shapes."""
    local = batch * heads * (tokens // world) * head_dim * itemsize  # q, k, v or out of one rank
    # the output head runs on each rank's tokens; gathered after its projection to 2x2 patches of 4 channels
    projected = batch * (tokens // world) * 2 * 2 * 4 * itemsize
    if mode == "ulysses":  # q, k, v in, out back: four all-to-alls keeping 1/world at home
        attention = {"all_to_all": layers * 4 * local * (world - 1) // world}
    else:  # K and V around the ring: world - 1 hops
        attention = {"ring": layers * 2 * local * (world - 1)}
    return {**attention, "all_gather": projected * (world - 1)}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_comm_bytes_equal_the_volume_computed_from_the_shapes(spawned, mode):
    counted = _ok(spawned[("dit", mode, "all")])["comm_bytes"]
    expected = _dit_bytes(mode)
    assert counted == {**expected, "total": sum(expected.values())}


@pytest.mark.slow
def test_fora2_with_sequence_parallel_skipped_blocks_send_nothing(spawned):
    dit = _ok(spawned[("dit", "ulysses", "fora2")])
    assert dit["max_diff"] <= 1e-5 and dit["decisions"] == dit["reference_decisions"]
    computed = dit["decisions"]["transformer_blocks.0"].count("compute")
    assert computed == 2  # of 4 steps
    per_call = _dit_bytes("ulysses")
    assert dit["comm_bytes"]["all_to_all"] == computed * per_call["all_to_all"]  # attention only where computed
    assert dit["comm_bytes"]["all_gather"] == 4 * per_call["all_gather"]  # the output every step
    wan = _ok(spawned[("wan", "ring", "fora2")])
    all_compute = _ok(spawned[("wan", "ring", "all")])["comm_bytes"]["ring"]
    assert wan["max_diff"] <= 1e-5 and wan["comm_bytes"]["ring"] == 2 * all_compute


@pytest.mark.slow
def test_the_backend_option_under_inductor_equals_single_process_fora2(spawned):
    compiled = _ok(spawned[("dit", "ring", "fora2", "compiled")])
    assert compiled["max_diff"] <= 1e-5 and compiled["decisions"] == compiled["reference_decisions"]
    assert compiled["comm_bytes"] == {}  # counted on the eager path only


@pytest.mark.slow
def test_four_ranks_ring_refresh_sends_only_the_refreshed_hops_and_equals_its_hand_reference(spawned4):
    from ditopt.runtime.stale_kv import refresh_hops

    r = _ok(spawned4[("stale", "refresh-half")])
    assert r["stale_steps"] == [1, 3] and max(r["diff_hand"]) <= 1e-5, r["diff_hand"]
    assert [refresh_hops(0.5, s, 4) for s in (1, 3)] == [[1, 3], [1, 2]]  # in turn: hop 2, then hop 3 reused
    layers, kv = 2, 2 * (2 * 2 * 4 * 8 * 4)  # K and V of one rank: batch 2, 2 heads, 4 of 16 tokens, dim 8, fp32
    for step, sent in enumerate(r["bytes"]):  # a reused hop sends nothing: 2 of the 3 hops' bytes
        assert sent["ring"] == layers * (2 if step in r["stale_steps"] else 3) * kv, (step, sent)
    assert min(r["diff_full"][s] for s in r["stale_steps"]) > 1e-5  # kept partials were used
