"""The benchmark's report: a markdown table per model, the section it splices into a markdown
file between its own markers, and the Pareto plot (matplotlib, imported only to draw it)."""

from __future__ import annotations

import datetime as _dt
import math
from typing import Sequence

from .measure import BenchResult


def format_table(result: BenchResult) -> str:
    """A markdown table of the rows (overhead rows marked), then the peers that could not run."""
    lines = ["| method | setting | block compute | speedup (time) | PSNR (dB) | SSIM | accuracy |",
             "|---|---|---|---|---|---|---|"]
    for r in result.rows:
        p = "inf" if math.isinf(r.psnr) else f"{r.psnr:.2f}"
        setting = f"{r.setting} (caches nothing: overhead)" if r.overhead else r.setting
        lines.append(f"| {r.method} | {setting} | {r.compute:.3f} | {r.speedup:.2f}x | {p} | {r.ssim:.3f} | "
                     f"{r.accuracy:.3f} |")
    if result.failed:
        lines.append("")
        lines.append("Could not run:")
        lines += [f"- {k}: {v}" for k, v in result.failed.items()]
    return "\n".join(lines)


def plot_pareto(results: Sequence[BenchResult], path: str) -> str:
    """Block compute fraction vs PSNR, one panel per model: every setting as a point (one marker
    style per method), and the Pareto fronts of all ditopt rows (solid) and all peer rows (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7.5 * len(results), 5.6), squeeze=False)
    for ax, res in zip(axes[0], results):
        rows = [r for r in res.rows if not r.overhead and not math.isinf(r.psnr) and r.family != "full"]
        methods = sorted({r.method for r in rows})
        # no greys or pale tints: every method must stay visible on white
        palette = [c for c in plt.get_cmap("tab20").colors[::2] if max(c) - min(c) > 0.15]
        palette += [c for c in plt.get_cmap("Dark2").colors if max(c) - min(c) > 0.15]
        planned = {"ditopt tuned plan (closed loop)": "tab:red", "ditopt profiled plan": "black"}
        ours_rest = [m for m in methods if m.startswith("ditopt") and m not in planned]
        peers = [m for m in methods if not m.startswith("ditopt")]
        for name in methods:
            pts = [r for r in rows if r.method == name]
            ours = name.startswith("ditopt")
            if name in planned:  # the plans the profiler and tuner make: drawn large, on top
                style = dict(s=90, marker="*", color=planned[name], zorder=4, edgecolors="none")
            else:
                style = dict(s=28 if ours else 22, marker="o" if ours else "s",
                             color=palette[(ours_rest if ours else peers).index(name) % len(palette)],
                             edgecolors="black" if ours else "none", linewidths=0.5)
            ax.scatter([r.compute for r in pts], [r.psnr for r in pts], label=name, **style)
        for family, style, label in ((True, "-", "ditopt front"), (False, "--", "peers front")):
            pts = sorted((r for r in rows if r.method.startswith("ditopt") == family), key=lambda r: r.compute)
            front, best = [], -math.inf
            for r in pts:  # the best PSNR at this compute or less
                if r.psnr > best:
                    front.append(r)
                    best = r.psnr
            if front:
                ax.step([r.compute for r in front], [r.psnr for r in front], style, where="post", color="black",
                        linewidth=1.2, label=label)
        ax.set_xlabel("fraction of block compute executed")
        ax.set_ylabel("PSNR vs full compute (dB)")
        ax.set_title(f"{res.model}: {res.steps} steps, {res.seeds} seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


BEGIN_MARK = "<!-- bench-fidelity:begin (written by tools/bench_fidelity.py) -->"
END_MARK = "<!-- bench-fidelity:end -->"


def report_markdown(results: Sequence[BenchResult], png: str | None, command: str) -> str:
    """The markdown section: command, date, one table per model, the plot, the peers that failed."""
    date = results[0].date if results else _dt.date.today().isoformat()
    parts = [BEGIN_MARK, f"## Fidelity and compute: ditopt presets and peers on the zoo models ({date})", "",
             "```", command, "```", "",
             "Columns: *block compute* is the fraction of the block stack's FLOPs executed over the generation "
             "(FlopCounterMode on the peers' eager runs; ditopt's from its runtime decisions times per-site "
             "FLOPs counted the same way); *speedup* is full-compute wall time over the method's, interleaved "
             "per seed in one process (on these small models Python overhead is a large share of a step, so "
             "speedups understate the compute saved and are noisy: see the overhead rows, whose work "
             "equals full compute's); PSNR and SSIM are against full compute with the same seed; *accuracy* is the share of samples (video: frames) the digit "
             "classifier labels as the requested digit. Rows marked *overhead* run a method at a setting "
             "that caches nothing.", ""]
    for res in results:
        parts += [f"### {res.model} ({res.steps} steps, {res.seeds} seeds x 10 digits)", "", format_table(res), ""]
    if png:
        parts += [f"![block compute vs PSNR]({png})", ""]
    parts.append(END_MARK)
    return "\n".join(parts) + "\n"


def write_report(results: Sequence[BenchResult], md_path: str, png_path: str | None, command: str) -> None:
    """Replace (or append) the harness's section of ``md_path``; write the Pareto PNG."""
    import os

    rel_png = None
    if png_path:
        plot_pareto(results, png_path)
        rel_png = os.path.relpath(png_path, os.path.dirname(os.path.abspath(md_path)))
    section = report_markdown(results, rel_png, command)
    text = open(md_path).read() if os.path.exists(md_path) else "# Benchmarks\n"
    if BEGIN_MARK in text and END_MARK in text:
        head, rest = text.split(BEGIN_MARK, 1)
        tail = rest.split(END_MARK, 1)[1]
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(md_path, "w") as f:
        f.write(text)
