"""Fidelity and speed of every caching method on a trained zoo model, in one process.

For a zoo model and N fixed seeds, the harness samples a full-compute reference, then runs each
method at each of its settings and records, against that reference:

- ``compute``: the fraction of block compute executed (FLOPs inside the block stack, summed over
  the generation, divided by full compute's). Peers run eagerly, so their block FLOPs are counted
  with ``torch.utils.flop_counter.FlopCounterMode`` and forward hooks on the stack's blocks
  (a block a peer skips contributes nothing). A ditopt model's blocks are not modules that run
  (they are regions of one rewritten graph), so its fraction is computed from the decisions the
  runtime took (``ditopt.stats(model).decisions``) times each site's FLOPs counted the same way
  on the unoptimised model; ``tests/test_cost.py`` checks that such a figure equals the FLOPs the
  rewritten graph executes, counted with FlopCounterMode around the graph module;
- ``speedup``: wall time of full compute / wall time of the method, the two interleaved per seed
  in the same process, summed over seeds;
- ``psnr`` and ``ssim`` of the final samples against full compute (data range 2, per image or
  per video frame, SSIM from scikit-image), averaged over seeds;
- ``accuracy``: the share of samples (or video frames) the zoo's digit classifier labels as the
  digit asked for.

Rows whose ``overhead`` flag is set run a method at a setting that caches nothing: their speedup
is the method's overhead.

Peers run through their own public APIs on a fresh copy of the same model: diffusers' cache
hooks (``ModelMixin.enable_cache``) and cache-dit (``cache_dit.enable_cache``, the optional
extra ``ditopt[peers]``). A peer that cannot be imported or fails on the model is reported, not
fatal.

Example (one seed, one method, two steps; a few seconds)::

    >>> from ditopt.bench import run_bench, format_table
    >>> result = run_bench("dit-digits", seeds=1, steps=2, methods=["ditopt:all-compute"], progress=False)
    >>> [r.method for r in result.rows]
    ['full', 'ditopt all-compute']
    >>> result.rows[-1].psnr == float("inf") and result.rows[-1].compute == 1.0
    True

The harness, by concern: :mod:`.method` (what a method is), :mod:`.ours` (ditopt's presets over
grids of their knobs, and the profiled and tuned plans), :mod:`.peers` (diffusers' and
cache-dit's methods), :mod:`.methods` (all of them by key), :mod:`.measure` (running them),
:mod:`.report` (tables, the markdown section, the Pareto plot) and :mod:`.cli` (the options of
``ditopt bench``). The compiler never imports this package; matplotlib and scikit-image are
imported only when a plot or an SSIM is made.
"""

from ditopt.metrics import psnr, ssim

from .cli import add_arguments, run_from_args
from .measure import DATA_RANGE, BenchResult, Row, _executed_block_flops, run_bench
from .method import Applied, Context, Method, Setting
from .methods import METHODS, method_names, register
from .ours import CALIBRATION_SEED
from .report import BEGIN_MARK, END_MARK, format_table, plot_pareto, report_markdown, write_report

__all__ = ["Applied", "BEGIN_MARK", "BenchResult", "CALIBRATION_SEED", "Context", "DATA_RANGE", "END_MARK",
           "METHODS", "Method", "Row", "Setting", "add_arguments", "format_table", "method_names", "plot_pareto",
           "psnr", "register", "report_markdown", "run_bench", "run_from_args", "ssim", "write_report"]
