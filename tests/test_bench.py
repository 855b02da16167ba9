"""The fidelity harness: a smoke run (2 seeds, 2 methods, few steps) and its bookkeeping."""

import math

import pytest

from ditopt.bench import (METHODS, Method, _executed_block_flops, format_table, register, run_bench,
                          write_report)
from ditopt.errors import DitoptError


@pytest.fixture(scope="module")
def smoke():
    register(Method("peer:missing", "peer", "Missing", lambda steps: [], requires="no_such_module_for_ditopt"))
    try:
        return run_bench("dit-digits", seeds=2, steps=4, progress=False,
                         methods=["ditopt:fora", "diffusers:fbcache", "peer:missing"])
    finally:
        METHODS.pop("peer:missing")


def test_smoke_rows(smoke):
    rows = {(r.method, r.setting): r for r in smoke.rows}
    full = rows[("full", "-")]
    assert full.compute == 1.0 and math.isinf(full.psnr) and full.accuracy >= 0.8
    fora2 = rows[("ditopt FORA", "interval=2")]
    # 4 steps, interval 2: steps 1 and 3 reuse every block
    assert fora2.compute == pytest.approx(0.5)
    assert 5 < fora2.psnr < 60 and 0 < fora2.ssim < 1
    assert rows[("ditopt FORA", "interval=4")].compute == pytest.approx(0.25)
    overhead = rows[("diffusers FirstBlockCache", "threshold=0")]
    assert overhead.overhead and overhead.compute == 1.0 and math.isinf(overhead.psnr)
    for r in smoke.rows:
        assert 0 < r.compute <= 1.0 and r.speedup > 0


def test_missing_peer_is_reported_and_the_rest_run(smoke):
    assert "cannot import no_such_module_for_ditopt" in smoke.failed["peer Missing"]
    assert any(r.family == "diffusers" for r in smoke.rows)
    assert "Could not run" in format_table(smoke)


def test_report_replaces_its_section(smoke, tmp_path):
    md = tmp_path / "B.md"
    md.write_text("# Benchmarks\n\nkept above\n")
    write_report([smoke], str(md), str(tmp_path / "p.png"), "cmd one")
    write_report([smoke], str(md), str(tmp_path / "p.png"), "cmd two")
    text = md.read_text()
    assert "kept above" in text and "cmd two" in text and "cmd one" not in text
    assert text.count("| ditopt FORA | interval=2 |") == 1
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_executed_flops_subtracts_only_outermost_reused_sub_sites():
    """The runtime marks a site inside a reused one ``skipped``: it is not subtracted again."""
    per_call = {"b.0": 10.0, "b.0.attn": 4.0, "b.0.attn.qk": 2.0, "b.0.ff": 3.0, "b.1": 10.0}
    decisions = {"b.0": ["compute", "compute", "reuse_residual"], "b.0.attn": ["compute", "reuse", "skipped"],
                 "b.0.attn.qk": ["compute", "skipped", "skipped"],
                 "b.0.ff": ["compute", "reuse", "skipped"], "b.1": ["compute", "reuse_residual", "compute"]}
    assert _executed_block_flops(decisions, ["b.0", "b.1"], per_call) == 20 + 3 + 10


def test_bad_input_names_it():
    with pytest.raises(DitoptError, match="no-such-method"):
        run_bench("dit-digits", methods=["no-such-method"], progress=False)
    with pytest.raises(DitoptError, match="unknown zoo model 'mars'"):
        run_bench("mars", progress=False)


def test_pareto_plot_draws_every_method_and_the_planned_ones_on_top(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb

    from ditopt.bench import BenchResult, Row, plot_pareto

    names = [f"ditopt M{i}" for i in range(12)] + [f"peer P{i}" for i in range(7)]
    rows = [Row(n, n.split()[0], "s", 0.3 + 0.03 * i, 1.0, 30.0 + i, 0.9, 1.0) for i, n in enumerate(names)]
    rows += [Row("ditopt tuned plan (closed loop)", "ditopt", "budget=0.5", 0.5, 1.0, 47.0, 0.99, 1.0),
             Row("ditopt profiled plan", "ditopt", "budget=0.5", 0.5, 1.0, 45.0, 0.99, 1.0)]
    shown = []
    real_savefig = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        shown.extend(c for ax in fig.axes for c in ax.collections)
        return real_savefig(fig, *args, **kwargs)

    plt.Figure.savefig = keep
    try:
        plot_pareto([BenchResult("m", 20, 2, rows)], str(tmp_path / "p.png"))
    finally:
        plt.Figure.savefig = real_savefig
    assert (tmp_path / "p.png").stat().st_size > 1000
    colours = {c.get_label(): to_rgb(c.get_facecolor()[0]) for c in shown}
    assert set(colours) == set(names) | {"ditopt tuned plan (closed loop)", "ditopt profiled plan"}
    for label, rgb in colours.items():  # nothing grey or pale, except the profiled plan's black
        assert max(rgb) - min(rgb) > 0.15 or label == "ditopt profiled plan", label
    assert len({colours[n] for n in names[:12]}) == 12 and len({colours[n] for n in names[12:]}) == 7
    tuned = next(c for c in shown if c.get_label() == "ditopt tuned plan (closed loop)")
    assert tuned.get_zorder() > max(c.get_zorder() for c in shown if c.get_label() in names)


@pytest.mark.slow
def test_the_speed_benchmark_runs_every_variant_on_the_cpu_at_a_tiny_size():
    from ditopt.bench import gpu

    rows = {r.variant: r for r in gpu.run("tiny", device="cpu", steps=4, repeats=1, log=lambda _: None)}
    expected = {"eager", "inductor", "diffusers FBCache", "diffusers TaylorSeer",
                *(f"ditopt {p}" for p in gpu.PLANS), *(f"ditopt compiled {p}" for p in gpu.PLANS)}
    assert set(rows) == expected
    assert all(r.seconds > 0 and r.speedup > 0 for r in rows.values())
    fora = rows["ditopt compiled FORA-2"]
    assert fora.block_fraction == pytest.approx(0.5)  # steps 0 and 2 compute
    tokens, hidden = 3 * 4 * 4, 32
    assert fora.cache_bytes == rows["ditopt FORA-2"].cache_bytes == 2 * tokens * hidden * 4  # one per CFG branch
    assert rows["ditopt all-compute"].block_fraction == 1.0 and rows["ditopt all-compute"].cache_bytes == 0
    assert "| ditopt compiled TaylorSeer-2 |" in gpu.markdown(list(rows.values()))


def test_actions_that_run_part_of_a_site_are_counted_not_derived():
    """share_cfg, partial and window do part of a site's work: the harness counts their FLOPs with
    FlopCounterMode (less what full compute spends outside the blocks) instead of deriving them
    from decisions, which would count such a block as not run at all."""
    from ditopt.bench.measure import _counted_actions

    assert _counted_actions({"b": ["compute", "partial", "reuse"], "b.a": ["window", "skipped", "compute"]}) == \
        {"partial", "window"}
    result = run_bench("dit-digits", seeds=1, steps=4, progress=False, methods=["ditopt:duca", "ditopt:ditfastattn"])
    rows = {(r.method, r.setting): r for r in result.rows}
    # duca at 4 steps, interval 3, ratio 0.25: step 0 full, 1 partial, 2 reuse, 3 full -> between 0.5 and 0.75
    duca = rows[("ditopt DuCa", "interval=3, ratio=0.25")]
    assert 0.5 < duca.compute < 0.75
    # ditfastattn at 4 steps (warm-up 2): step 2 computes full attention and the window (the
    # residual it keeps), step 3 the window only (16 of 64 tokens at interval 2): a little under full
    fast = rows[("ditopt DiTFastAttn (static)", "window=16, interval=2")]
    assert 0.8 < fast.compute < 1.0


def test_profiled_and_tuned_settings_leave_out_budgets_the_step_count_cannot_meet():
    """At 10 steps no plan spends less than 0.3 (step 0 computed, at most 3 in a row not): the 0.25
    settings made `ditopt bench --steps 10` fail after every other setting had run."""
    from ditopt.bench.ours import _profiled_settings, _tuned_settings

    for make in (_profiled_settings, _tuned_settings):
        assert [s.label for s in make(10)] == ["budget=0.5", "budget=0.4", "budget=0.35"]
        assert [s.label for s in make(20)][-1] == "budget=0.25"
